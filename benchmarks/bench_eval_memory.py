"""Peak memory and speed of fairseq-eval-lm on a dense checkpoint vs the packed compressed one.

Uses the demo's checkpoints (run `make demo` first): the packed iPQ model, and the same model
unpacked to dense fp32 (`quant-noise unpack`, inference-only like the packed file), plus the
dense training checkpoint. Each eval runs in its own process; peak RSS is that process' maxrss.
Writes results/bench_eval_memory.{md,json}.

    python benchmarks/bench_eval_memory.py [--repeat 2]
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402
DEMO = REPO / "checkpoints/demo"

EVAL = """
import resource, sys
from fairseq_cli.eval_lm import cli_main
sys.argv = ["fairseq-eval-lm"] + sys.argv[1:]
cli_main()
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def evaluate(path: Path):
    cmd = [sys.executable, "-c", EVAL, str(REPO / "data/lm/bin"), "--user-dir", str(REPO / "quant_noise_plugin"), "--path", str(path),
           "--gen-subset", "test", "--cpu", "--tokens-per-sample", "128", "--max-tokens", "4096", "--context-window", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(text[-3000:])
    tps = float(re.search(r"\(([\d.,]+) tokens/s\)", text).group(1).replace(",", ""))
    ppl = float(text.rsplit("Perplexity:", 1)[1].split()[0])
    rss = int(re.search(r"MAXRSS_KB (\d+)", text).group(1)) / 1024
    return {"tokens_per_s": tps, "ppl": ppl, "peak_rss_mb": rss, "file_mb": path.stat().st_size / 1e6}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2, help="runs per checkpoint; the best speed is kept")
    args = parser.parse_args()
    packed = DEMO / "kjv_lm_ipq.packed.pt"
    if not packed.exists():
        raise SystemExit("run `make demo` first (needs checkpoints/demo/kjv_lm_ipq.packed.pt)")
    dense = DEMO / "kjv_lm_ipq.dense.pt"
    subprocess.run([str(BIN / "quant-noise"), "unpack", str(packed), str(dense)], check=True, capture_output=True)
    trained = sorted(DEMO.glob("dense-*/checkpoint_last.pt"))
    runs = {"dense fp32, inference-only (unpacked)": dense, "packed iPQ": packed}
    if trained:
        runs["dense training checkpoint (with Adam state)"] = trained[-1]
    results = {}
    for name, path in runs.items():
        print(f"evaluating {name} ...", flush=True)
        trials = [evaluate(path) for _ in range(args.repeat)]
        best = max(trials, key=lambda r: r["tokens_per_s"])
        best["peak_rss_mb"] = min(t["peak_rss_mb"] for t in trials)
        results[name] = best
    base = results["dense fp32, inference-only (unpacked)"]
    lines = ["| checkpoint | file | peak RSS | eval tokens/s | speed vs dense | test ppl |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['file_mb']:.2f} MB | {r['peak_rss_mb']:.0f} MB | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.3f} | {r['ppl']:.2f} |")
    table = "\n".join(lines)
    write_result(
        "bench_eval_memory", "fairseq-eval-lm: dense vs packed (demo model, KJV test split, 2 CPU cores)", table,
        f"Best speed and lowest peak RSS of {args.repeat} runs each. Goal: packed within 10% of dense speed, lower peak memory.", results,
    )


if __name__ == "__main__":
    main()
