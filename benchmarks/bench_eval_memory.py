"""Peak memory and speed of fairseq-eval-lm: dense fp32, packed iPQ, and int8 activations (w8a8).

Uses the demo's checkpoints (run `make demo` first; found through the demo experiment's runner): the iPQ model packed three ways (fp16
centroids; int8 centroids and rest with calibrated int8 activations on the int8 kernels; the same
file on the fake-quant reference path, ``QUANT_NOISE_INT8_KERNELS=0``), the same iPQ model unpacked
to dense fp32 (`quant-noise unpack`, inference-only like the packed files: the speed anchor), and
the dense trained model packed w8a8. Each eval runs in its own process, the runs interleaved and
repeated; the best speed and lowest peak RSS of each are kept. Writes results/bench_eval_memory.{md,json}.

    python benchmarks/bench_eval_memory.py [--repeat 3] [--ipq CKPT --trained CKPT]

``--ipq``/``--trained`` take any LM's iPQ and dense training checkpoints instead of the demo's
(e.g. the cached runs of ``scripts/reproduce.py``).
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "scripts"))
from _results import write_result  # noqa: E402
from experiments.grid import load_grid  # noqa: E402
from experiments.runs import Runner  # noqa: E402
from experiments.shell import pack_once as pack  # noqa: E402

WORK = REPO / "work_dirs" / "reproduce"


def row_checkpoints(preset: str, row: str):
    """A grid row's iPQ and dense training checkpoints, where `make demo` / `make reproduce` leave them."""
    runner = Runner(load_grid(), preset, None, WORK, REPO / "data")
    return (runner.ipq_command("lm", row)[1] / "checkpoint_last.pt", runner.train_command("lm", row)[1] / "checkpoint_last.pt")

EVAL = """
import resource, sys
from fairseq_cli.eval_lm import cli_main
sys.argv = ["fairseq-eval-lm"] + sys.argv[1:]
cli_main()
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def evaluate(path: Path, env=None):
    cmd = [sys.executable, "-c", EVAL, str(REPO / "data/lm/bin"), "--user-dir", str(REPO / "quant_noise_plugin"), "--path", str(path),
           "--gen-subset", "test", "--cpu", "--tokens-per-sample", "128", "--max-tokens", "4096", "--context-window", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    text = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(text[-3000:])
    tps = float(re.search(r"\(([\d.,]+) tokens/s\)", text).group(1).replace(",", ""))
    ppl = float(text.rsplit("Perplexity:", 1)[1].split()[0])
    rss = int(re.search(r"MAXRSS_KB (\d+)", text).group(1)) / 1024
    return {"tokens_per_s": tps, "ppl": ppl, "peak_rss_mb": rss, "file_mb": path.stat().st_size / 1e6}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per checkpoint; the best speed is kept")
    parser.add_argument("--preset", default="quick", help="with --row: the grid preset (default quick)")
    parser.add_argument("--row", help="an LM row of the grid (e.g. none) whose cached runs to use (default: the demo's row)")
    parser.add_argument("--ipq", type=Path, help="the iPQ checkpoint (default: the row's)")
    parser.add_argument("--trained", type=Path, help="the dense training checkpoint (default: the row's)")
    args = parser.parse_args()
    row = args.row or load_grid().experiments["demo"].modes[0]
    demo_ipq, demo_trained = row_checkpoints(args.preset, row)
    ipq, trained = [args.ipq or demo_ipq], [args.trained or demo_trained]
    for path in ipq + trained:
        if not path.is_file():
            raise SystemExit(f"{path}: no such checkpoint (run `make demo` first, or pass --ipq and --trained)")
    bench = ipq[-1].parent / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    calibrate = ["--scalar-bits", 8, "--activation-bits", 8, "--calibrate", REPO / "data/lm/bin"]
    packed, w8a8, dense_w8a8 = bench / "ipq.packed.pt", bench / "ipq_w8a8.packed.pt", bench / "dense_w8a8.packed.pt"
    pack(ipq[-1], packed)
    pack(ipq[-1], w8a8, *calibrate)
    pack(trained[-1], dense_w8a8, *calibrate)
    dense = bench / "ipq.dense.pt"
    subprocess.run([str(BIN / "quant-noise"), "unpack", str(packed), str(dense)], check=True, capture_output=True)
    runs = {
        "dense fp32 (the iPQ model unpacked)": (dense, None),
        "packed iPQ (fp16 centroids)": (packed, None),
        "packed iPQ + w8a8, int8 kernels": (w8a8, None),
        "packed iPQ + w8a8, fake-quant reference": (w8a8, {"QUANT_NOISE_INT8_KERNELS": "0"}),
        "dense w8a8 (the trained model), int8 kernels": (dense_w8a8, None),
    }
    trials = {name: [] for name in runs}
    for i in range(args.repeat):  # interleaved: a slow moment of the machine hits every checkpoint alike
        for name, (path, env) in runs.items():
            print(f"[{i + 1}/{args.repeat}] evaluating {name} ...", flush=True)
            trials[name].append(evaluate(path, env))
    results = {}
    for name, runs_of in trials.items():
        best = dict(max(runs_of, key=lambda r: r["tokens_per_s"]))
        best["peak_rss_mb"] = min(t["peak_rss_mb"] for t in runs_of)
        best["all_tokens_per_s"] = [t["tokens_per_s"] for t in runs_of]
        results[name] = best
    base = results["dense fp32 (the iPQ model unpacked)"]
    lines = ["| checkpoint | file | peak RSS | eval tokens/s | speed vs dense fp32 | test ppl |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['file_mb']:.2f} MB | {r['peak_rss_mb']:.0f} MB | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.3f} | {r['ppl']:.2f} |")
    table = "\n".join(lines)
    kernel, reference = results["packed iPQ + w8a8, int8 kernels"], results["packed iPQ + w8a8, fake-quant reference"]
    notes = (
        f"Best speed and lowest peak RSS of {args.repeat} interleaved runs each (one process per run, 2 CPU cores). "
        f"Goals: packed iPQ within 10% of dense speed with lower peak memory; the int8 path at >= 1.3x dense fp32 speed with "
        f"perplexity equal to its fake-quant reference within 0.1% (here {100 * abs(kernel['ppl'] / reference['ppl'] - 1):.3f}%). "
        f"w8a8 files: `quant-noise pack --scalar-bits 8 --activation-bits 8 --calibrate data/lm/bin` (mse observer, 32 batches)."
    )
    source = "demo model" if not args.ipq else f"`{args.ipq.parent.name}`"
    shown = {path: path.relative_to(REPO) if path.is_relative_to(REPO) else path for path in (ipq[-1], trained[-1])}
    notes += f" Checkpoints: iPQ `{shown[ipq[-1]]}`, trained `{shown[trained[-1]]}`."
    write_result("bench_eval_memory", f"fairseq-eval-lm: dense fp32, packed iPQ, int8 activations ({source}, KJV test split)", table, notes, results)


if __name__ == "__main__":
    main()
