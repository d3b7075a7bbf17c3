"""The budget planner (`quant-noise plan`): are its cheap sensitivities right, and at what time?

On a trained checkpoint, e.g. the frontier's 2 x 128 LM): every (weight, setting) pair's calibration
loss rise measured directly (``--measure-all``, the ground truth), against the planner's two cheaper estimates:
``measured`` (measured at one setting per weight, carried to the others by their activation-weighted error) and
``fisher`` (squared gradients, one backward pass per batch). Reported: the rank correlation of each estimate with the
truth over all pairs, and what each estimate's plan at ``--target`` bytes costs by the truth's measure (the summed
measured rise of its picks) against the plan the truth itself makes; and the time each takes.

The planner's time and memory at the paper's scale (x25 of the 247 M-parameter LM) are a row of
`benchmarks/bench_paper_scale.py` (results/paper_scale.md; `--plan-only` runs that row alone).

    python benchmarks/bench_plan.py --checkpoint CKPT --data DATA_DIR [--target-size 212KB]
    python benchmarks/bench_plan.py --render-only   # rewrite results/plan.md from results/plan.json

Writes results/plan.{md,json}.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_result  # noqa: E402


def command() -> str:
    sys.path.insert(0, str(REPO / "scripts"))
    from experiments.provenance import portable

    return "python " + portable(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def rank_correlation(a, b) -> float:
    import torch

    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def proxy_section(args) -> dict:
    from quant_noise_plugin.budget import measure_menus, parse_size, plan_budget, reference_bits_for, weight_menus
    from quant_noise_plugin.checkpoints import read_checkpoint
    from quant_noise_plugin.cli import _calibration_batches, _load_model

    state = read_checkpoint(args.checkpoint)
    model, task = _load_model(state, args.checkpoint, args.data)
    batches, criterion = _calibration_batches(state, model, task, args.data, args.calibration_batches)
    run = lambda sample: criterion(model, sample)  # noqa: E731
    target = parse_size(args.target_size)
    menu_of = lambda: weight_menus(model, 8, args.block_sizes, args.centroids)  # noqa: E731
    reference_bits = reference_bits_for(menu_of(), target)
    menus, seconds = {}, {}
    for name, kwargs in (("truth", {"measure_all": True}), ("measured", {}), ("fisher", {"sensitivity": "fisher"})):
        menus[name] = menu_of()
        start = time.perf_counter()
        base = measure_menus(model, menus[name], batches, run, 8, reference_bits, **kwargs)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    truth = {(m.name, c.setting): c.rise for m in menus["truth"] for c in m.choices}
    rows = {}
    for name in ("truth", "measured", "fisher"):
        pairs = [(truth[(m.name, c.setting)], c.rise) for m in menus[name] for c in m.choices]
        plan = plan_budget(model, state, menus[name], target, 8, base, len(batches))
        true_cost = sum(truth[(m.name, c.setting)] for m, c in zip(plan.menus, plan.picks))
        rows[name] = {"seconds": seconds[name], "rank_correlation": rank_correlation(*zip(*pairs)),
                      "plan_file_bytes": plan.predicted_file_bytes, "plan_true_rise": true_cost,
                      "plan_pq_weights": sum(c.setting.is_pq for c in plan.picks)}
    return {"command": command(), "checkpoint": os.path.relpath(args.checkpoint, REPO), "block_sizes": args.block_sizes,
            "centroids": args.centroids, "target_bytes": target, "calibration_batches": len(batches),
            "base_loss": base, "pairs": len(truth), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render-only", action="store_true", help="rewrite results/plan.md from results/plan.json")
    parser.add_argument("--checkpoint", help="proxy: a trained (dense or Quant-Noise) checkpoint")
    parser.add_argument("--data", help="proxy: its binarized data (calibration batches)")
    parser.add_argument("--target-size", default="212KB", help="proxy: the budget the three plans are made for (default 212KB)")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16], help="proxy: the menu's block sizes (default 8 16)")
    parser.add_argument("--centroids", type=int, nargs="+", default=[4, 16, 64, 256], help="proxy: its centroid counts (default 4 16 64 256)")
    parser.add_argument("--note", help="how the machine was when this ran (kept with the section's results)")
    args = parser.parse_args()
    previous = RESULTS / "plan.json"
    data = json.loads(previous.read_text()) if previous.exists() else {}
    data.pop("paper_scale", None)  # now a row of bench_paper_scale.py
    if not args.render_only:
        if not (args.checkpoint and args.data):
            parser.error("give --checkpoint CKPT and --data DATA_DIR (or --render-only)")
        data["proxy"] = proxy_section(args) | ({"note": args.note} if args.note else {})
    lines = []
    if "proxy" in data:
        p = data["proxy"]
        lines += [f"Sensitivities on `{p['checkpoint']}` ({p['pairs']} weight x setting pairs: block sizes {p['block_sizes']}, K "
                  f"{p['centroids']} or int8; {p['calibration_batches']} calibration "
                  f"batches, loss {p['base_loss']:.4f}); plans for {p['target_bytes']:,} bytes:", "",
                  "| sensitivity | time (s) | rank correlation with the truth | plan's true summed rise | its file (bytes) | weights in PQ |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in p["rows"].items():
            lines.append(f"| {name}{' (every pair measured)' if name == 'truth' else ''} | {r['seconds']:.1f} | {r['rank_correlation']:.3f} | "
                         f"{r['plan_true_rise']:+.4f} | {r['plan_file_bytes']:,} | {r['plan_pq_weights']} |")
        lines += ["", f"Section's command: `{p['command']}`" + (f" ({p['note']})" if p.get("note") else "")]
    lines += ["", "The planner at the paper's scale (x25 of the 247 M-parameter LM, `--sensitivity fisher`): its time and memory are "
              "in results/paper_scale.md (`python benchmarks/bench_paper_scale.py --plan-only`)."]
    notes = ("The truth measures each pair's calibration-loss rise with that weight alone quantized; `measured` (the planner's "
             "default) measures one setting per weight and scales by the activation-weighted error; `fisher` runs one backward "
             "pass per batch. A plan's true summed rise is the truth's rises summed over the plan's picks (lower is better; "
             "the truth's own plan is the best any can do by this measure). One run, this machine (2 cores).")
    write_result("plan", "The budget planner: sensitivities and time", "\n".join(lines), notes, data)


if __name__ == "__main__":
    main()
