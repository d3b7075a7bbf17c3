#!/usr/bin/env python
"""Quant-Noise training on 1 process (all cores as threads) vs N processes (torchrun, gloo, one thread each) on
this machine, the same global batch. Writes results/distributed_cpu.{md,json}.

    python benchmarks/bench_distributed_cpu.py [--processes 2] [--repeat 2] [--updates 40]
"""
import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _logs import train_wps  # noqa: E402
from _results import write_result  # noqa: E402

BIN = Path(sys.executable).parent
TOKENS = 2048


def tokens_per_s(cmd) -> float:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)
    wps = train_wps(out.stdout + out.stderr)
    if out.returncode or not wps:
        raise SystemExit((out.stdout + out.stderr)[-3000:])
    return wps[-1]  # the last interval: start-up excluded


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--updates", type=int, default=40)
    args = parser.parse_args()
    common = [REPO / "data/lm/bin", "--user-dir", REPO / "quant_noise_plugin", "--task", "language_modeling", "--arch",
              "qn_transformer_lm_small", "--quant-noise-pq", "0.1", "--tokens-per-sample", 128, "--optimizer", "adam", "--lr", 0.001,
              "--max-update", args.updates, "--log-format", "simple", "--log-interval", 10, "--cpu", "--num-workers", 0,
              "--disable-validation", "--no-save", "--seed", 1]
    runs = {"1 process": [BIN / "fairseq-train", *common, "--max-tokens", TOKENS],
            f"{args.processes} processes (torchrun, gloo)": [
                BIN / "torchrun", "--nproc_per_node", args.processes, "--master_port", 29561, BIN / "fairseq-train", *common,
                "--max-tokens", TOKENS // args.processes, "--distributed-world-size", args.processes, "--distributed-backend", "gloo",
                "--ddp-backend", "legacy_ddp"]}
    trials = {name: [] for name in runs}
    for _ in range(args.repeat):  # interleaved
        for name, cmd in runs.items():
            trials[name].append(tokens_per_s(cmd))
    best = {name: max(t) for name, t in trials.items()}
    base = best["1 process"]
    table = "\n".join(["| run | tokens/s (best) | all | vs 1 process |", "|---|---:|---|---:|"] + [
        f"| {name} | {best[name]:,.0f} | {', '.join(f'{t:,.0f}' for t in trials[name])} | {best[name] / base:.2f} |" for name in runs])
    notes = (f"`qn_transformer_lm_small` with `--quant-noise-pq 0.1` on the KJV, the same global batch of {TOKENS:,} tokens a "
             f"step, {args.updates} updates, the speed of the last 10; one process uses every core as threads, torchrun's "
             f"processes one thread each (its default). The machine's other jobs paused.")
    write_result("distributed_cpu", "Quant-Noise training: one process vs several (fairseq's distributed engine on CPU)", table, notes,
                 {"trials": trials, "best": best})


if __name__ == "__main__":
    main()
