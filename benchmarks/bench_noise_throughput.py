"""Training throughput (tokens/s) with Quant-Noise vs without, through real fairseq-train runs.

Same model (a 4-layer 256-wide transformer LM on the KJV data), same run length: no noise, the
plugin's PQ noise, the plugin's scalar noise, and fairseq's built-in --quant-noise-pq on
transformer_lm. The runs are interleaved round-robin --repeats times and each keeps its best
words/s (of the logged intervals after the first), so a passing load on the machine does not
favour one of them. Ratios are to the no-noise run. Writes results/bench_noise_throughput.{md,json}.

    python benchmarks/bench_noise_throughput.py [--updates 100] [--repeats 3]
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _logs import train_wps  # noqa: E402
from _results import write_result  # noqa: E402
MODEL = ["--decoder-layers", "4", "--decoder-embed-dim", "256", "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
         "--share-decoder-input-output-embed", "--decoder-input-dim", "256", "--decoder-output-dim", "256"]
RUNS = {
    "no noise (qn_transformer_lm)": ["--arch", "qn_transformer_lm"],
    "plugin PQ noise 0.1": ["--arch", "qn_transformer_lm", "--quant-noise-pq", "0.1"],
    "plugin scalar noise 0.5 int8": ["--arch", "qn_transformer_lm", "--quant-noise-scalar", "0.5"],
    "plugin PQ noise 0.1 via qn_cross_entropy on transformer_lm": ["--arch", "transformer_lm", "--criterion", "qn_cross_entropy", "--quant-noise-pq", "0.1"],
    "fairseq built-in --quant-noise-pq 0.1 (transformer_lm)": ["--arch", "transformer_lm", "--quant-noise-pq", "0.1"],
}


def words_per_second(args, updates):
    with tempfile.TemporaryDirectory() as save:
        cmd = [str(BIN / "fairseq-train"), str(REPO / "data/lm/bin"), "--user-dir", str(REPO / "quant_noise_plugin"),
               "--task", "language_modeling", *MODEL, *args, "--optimizer", "adam", "--lr", "0.0005",
               "--tokens-per-sample", "128", "--max-tokens", "2048", "--max-update", str(updates), "--save-dir", save,
               "--no-save", "--disable-validation", "--log-format", "simple", "--log-interval", "20", "--cpu", "--num-workers", "0", "--seed", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
        wps = train_wps(out.stdout + out.stderr)
        return sum(wps[1:]) / len(wps[1:])  # the first interval includes start-up


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (REPO / "data/lm/bin").exists():
        raise SystemExit("run `quant-noise data --output data` (or make demo) first")
    trials = {name: [] for name in RUNS}
    for repeat in range(args.repeats):
        for name, flags in RUNS.items():
            print(f"round {repeat + 1}/{args.repeats}: {name} ...", flush=True)
            trials[name].append(words_per_second(flags, args.updates))
    results = {name: max(values) for name, values in trials.items()}
    base = results["no noise (qn_transformer_lm)"]
    lines = ["| run | tokens/s | vs no noise |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,.0f} | {v / base:.3f} |" for k, v in results.items()]
    table = "\n".join(lines)
    write_result(
        "bench_noise_throughput", f"Training throughput with Quant-Noise (2 CPU cores, fairseq-train, {args.updates} updates a run, best of {args.repeats} interleaved)",
        table, "Goal: PQ noise costs <= 5% throughput, scalar noise <= 15%.", {"best": results, "trials": trials},
    )


if __name__ == "__main__":
    main()
