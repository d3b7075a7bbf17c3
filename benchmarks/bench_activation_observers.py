"""Which observer fixes the int8 activation ranges best: minmax, percentile or mse, chosen on valid.

For each trained LM given (default: the quick reproduction's rows, both seeds, from
work_dirs/reproduce), `quant-noise pack --scalar-bits 8 --activation-bits 8 --calibrate data/lm/bin
--observer X` on the dense model and on its iPQ model, then fairseq-eval-lm on valid and test;
the int8-weights-only file (`--scalar-bits 8`) is the reference each is compared with. Writes
results/activation_observers.{md,json}.

    python benchmarks/bench_activation_observers.py [--runs DIR ...] [--batches 32]
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "scripts"))
from _results import write_result  # noqa: E402
from experiments.grid import load_grid  # noqa: E402
from experiments.metrics import perplexity  # noqa: E402
from experiments.runs import Runner  # noqa: E402
from experiments.shell import pack_once as pack  # noqa: E402

OBSERVERS = ("minmax", "percentile", "mse")
QUICK = Runner(load_grid(), "quick", None, REPO / "work_dirs" / "reproduce", REPO / "data")  # its evaluation settings


def eval_lm(path: Path, subset: str) -> float:
    return perplexity(QUICK, path, subset)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", help="quick-preset LM rows whose cached runs to use (e.g. none)")
    parser.add_argument("--runs", nargs="*", help="training run directories (checkpoint_last.pt inside; default: the reproduction's LM runs)")
    parser.add_argument("--batches", type=int, default=32, help="calibration batches")
    parser.add_argument("--ipq-only", action="store_true", help="only the iPQ models (ipq+w8a8)")
    args = parser.parse_args()
    work = REPO / "work_dirs" / "reproduce"
    runs = [Path(r) for r in args.runs] if args.runs else sorted(p for p in work.glob("lm-train-*") if (p / "DONE").exists())
    if args.rows:
        runs = [QUICK.train_command("lm", row)[1] for row in args.rows]
    models = []
    for run in runs:
        ipq = sorted(p for p in work.glob(f"{run.name}-ipq-*") if (p / "DONE").exists())
        if not args.ipq_only:
            models.append(("dense", run / "checkpoint_last.pt"))
        models += [("ipq", p / "checkpoint_last.pt") for p in ipq]
    if not models:
        raise SystemExit("no trained LM under work_dirs/reproduce: run scripts/reproduce.py --preset quick first")
    out_dir = work / "observers"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for kind, model in models:
        tag = model.parent.name
        row = {"model": tag, "kind": kind}
        int8 = out_dir / f"{tag}-int8.pt"
        pack(model, int8, "--scalar-bits", 8)
        row["int8"] = {subset: eval_lm(int8, subset) for subset in ("valid", "test")}
        for observer in OBSERVERS:
            packed = out_dir / f"{tag}-w8a8-{observer}.pt"
            pack(model, packed, "--scalar-bits", 8, "--activation-bits", 8, "--calibrate", REPO / "data/lm/bin",
                 "--calibration-batches", args.batches, "--observer", observer)
            row[observer] = {subset: eval_lm(packed, subset) for subset in ("valid", "test")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    render(rows, args.batches)


TIE = 0.0005  # 0.05%: below what perplexities printed to 2 decimals resolve
DEFAULT = "mse"  # quant_noise_plugin.activations' default observer


def render(rows: list, batches: int) -> None:
    """The table, and the observer chosen on valid (or a tie, which keeps the default)."""
    lines = ["| model | weights | int8 weights only (valid / test) | " + " | ".join(f"w8a8, {o} (valid / test)" for o in OBSERVERS) + " |",
             "|---|---|---:|" + "---:|" * len(OBSERVERS)]
    for row in rows:
        base = row["int8"]
        cells = [f"{row[o]['valid']:.2f} / {row[o]['test']:.2f} ({100 * (row[o]['valid'] / base['valid'] - 1):+.2f}% valid)" for o in OBSERVERS]
        lines.append(f"| {row['model']} | {row['kind']} | {base['valid']:.2f} / {base['test']:.2f} | " + " | ".join(cells) + " |")
    mean_cost = {o: sum(r[o]["valid"] / r["int8"]["valid"] - 1 for r in rows) / len(rows) for o in OBSERVERS}
    best = min(mean_cost, key=mean_cost.get)
    spread = max(mean_cost.values()) - min(mean_cost.values())
    choice = (f"chosen on valid: **{best}**" if spread >= TIE else
              f"a tie (spread {100 * spread:.2f}% < {100 * TIE:.2f}%, below what 2-decimal perplexities resolve): the default "
              f"stays **{DEFAULT}** (like percentile, a lone outlier activation does not widen its range; unlike "
              f"percentile, the clipping comes from the data, not from a fixed fraction)")
    notes = (f"Perplexity (fairseq-eval-lm, --tokens-per-sample 128 --context-window 64). Calibration: {batches} shuffled training batches "
             f"of 2048 tokens. Mean valid cost of int8 activations over int8 weights alone: "
             + ", ".join(f"{o} {100 * c:+.2f}%" for o, c in mean_cost.items()) + f"; {choice}.")
    write_result("activation_observers", "int8 activation observers on the KJV LM (valid to choose, test to report)", "\n".join(lines), notes, rows)


if __name__ == "__main__":
    main()
