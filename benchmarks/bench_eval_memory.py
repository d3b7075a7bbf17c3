#!/usr/bin/env python
"""Inference speed and memory of compressed LMs against the same weights dense, on this CPU and (emulated) on
an AVX2 CPU without VNNI. Writes results/bench_eval_memory.{md,json}.

    python benchmarks/bench_eval_memory.py [--repeat 2] [--data DIR] [--ipq CKPT --trained CKPT] [--no-sweep]

1. A trained LM (default: the quick grid's `qn_pq_0.1` row and its ipq column): fairseq-eval-lm on the test split
   of ``--data`` with the iPQ model dense (`quant-noise unpack`: the anchor), packed (decoded once, the
   default; and QUANT_NOISE_LOW_MEMORY=1, rebuilt at every forward), packed w8a8 (int8 weights and
   calibrated int8 activations: each layer int8 or float as measured at load; and the fake-quant reference)
   and the trained model packed w8a8. Speed, perplexity, the process's peak RSS, and the model's own
   resident memory (RSS after loading it and one forward, minus RSS of the same process just before: fairseq,
   the plugin and the task's dictionary loaded; the meta device cannot build fairseq's models).
2. A shape sweep (random weights: speed only): 64- to 512-wide models of 2 and 4 layers, one iPQ update,
   dense / packed / w8a8; the model's forward on test batches of ``--data``, one process per run.

Each CPU class runs every checkpoint in its own process, interleaved and repeated; best speed kept. "AVX2
without VNNI" is this CPU with oneDNN, MKL and ATen limited to AVX2 (their own switches,
``ONEDNN_MAX_CPU_ISA=AVX2`` etc.): the int8 kernel's arithmetic of that class, not its clock or caches.
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
from _logs import PRINT_PEAK_RSS, logged  # noqa: E402
from _results import write_result  # noqa: E402
from experiments.grid import load_grid  # noqa: E402
from experiments.runs import Runner  # noqa: E402
from experiments.shell import PLUGIN, pack_once as pack, sh  # noqa: E402

WORK = REPO / "work_dirs" / "reproduce"
CPU_CLASSES = {"this CPU": {}, "AVX2 without VNNI (emulated)": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                                                  "ATEN_CPU_CAPABILITY": "avx2"}}
# glibc raises its mmap threshold as big blocks are freed (fairseq builds the dense model before the compressed
# layers drop it), after which freed memory stays in RSS and hides what the model holds: a fixed threshold returns it
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SWEEP = [(width, layers) for width in (64, 128, 256, 512) for layers in (2, 4)]

EVAL = """
import sys
from fairseq_cli.eval_lm import cli_main
sys.argv = ["fairseq-eval-lm"] + sys.argv[1:]
cli_main()
""" + PRINT_PEAK_RSS

RESIDENT = """
import gc, sys, torch
import quant_noise_plugin
from fairseq import checkpoint_utils, tasks
from quant_noise_plugin.checkpoints import read_checkpoint
from omegaconf import OmegaConf
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
path, data = sys.argv[1], sys.argv[2]
cfg = OmegaConf.create(read_checkpoint(path)["cfg"], flags={"allow_objects": True})
cfg.task.data = data
task = tasks.setup_task(cfg.task)  # the dictionary; the architecture's code was imported with the plugin
gc.collect()
before = rss_mb()
models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data}, task=task)
model = models[0].eval()
with torch.no_grad():
    model(torch.arange(4, 20).reshape(1, 16))  # a tiny batch: decoded weights and int8 packs built, no big activations
gc.collect()
print("MODEL_MB", rss_mb() - before)
"""

FORWARD = """
import sys, time, torch
import quant_noise_plugin
from fairseq import checkpoint_utils
path, data, n_batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
model = models[0].eval()
task.load_dataset("test")
tokens = torch.cat([task.dataset("test")[i]["source"] for i in range(len(task.dataset("test")))])
batches = [tokens[i * 2048:(i + 1) * 2048].reshape(16, 128) for i in range(n_batches)]
best = float("inf")
with torch.no_grad():
    model(batches[0])
    for _ in range(3):
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        best = min(best, time.perf_counter() - start)
print("TOKENS_PER_S", n_batches * 2048 / best)
"""


def python(code: str, *args, env=None) -> str:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit((out.stdout + out.stderr)[-3000:])
    return out.stdout + out.stderr


def eval_lm(path: Path, data: Path, env) -> dict:
    text = python(EVAL, data, "--user-dir", PLUGIN, "--path", path, "--gen-subset", "test", "--cpu", "--tokens-per-sample", 128,
                  "--max-tokens", 4096, "--context-window", 64, env=env)
    said = [line.split("int8 activations: ", 1)[1] for line in text.splitlines() if "int8 activations: " in line]
    return {"tokens_per_s": float(re.search(r"\(([\d.,]+) tokens/s\)", text).group(1).replace(",", "")),
            "ppl": float(text.rsplit("Perplexity:", 1)[1].split()[0]), "peak_rss_mb": logged("MAXRSS_KB", text) / 1024,
            "file_mb": path.stat().st_size / 1e6, "load_line": said[0] if said else ""}


def row_checkpoints(preset: str, row: str):
    """A grid row's iPQ and dense training checkpoints, where `make reproduce` leaves them."""
    runner = Runner(load_grid(), preset, None, WORK, REPO / "data")
    return (runner.ipq_command("lm", row)[1] / "checkpoint_last.pt", runner.train_command("lm", row)[1] / "checkpoint_last.pt")


def best_of(trials: list) -> dict:
    best = dict(max(trials, key=lambda r: r["tokens_per_s"]))
    best["all_tokens_per_s"] = [t["tokens_per_s"] for t in trials]
    for key in ("peak_rss_mb", "model_mb"):
        if key in best:
            best[key] = min(t[key] for t in trials)
    return best


def trained_section(args, bench: Path) -> dict:
    ipq, trained = args.ipq, args.trained
    calibrate = ["--scalar-bits", 8, "--activation-bits", 8, "--calibrate", args.data]
    packed, w8a8, dense_w8a8, dense = (bench / name for name in ("ipq.packed.pt", "ipq_w8a8.packed.pt", "dense_w8a8.packed.pt", "ipq.dense.pt"))
    pack(ipq, packed)
    pack(ipq, w8a8, *calibrate)
    pack(trained, dense_w8a8, *calibrate)
    if not dense.exists():
        sh(["quant-noise", "unpack", packed, dense])
    runs = {"dense fp32 (the iPQ model unpacked)": (dense, {}), "packed iPQ, decoded once (default)": (packed, {}),
            "packed iPQ, low memory (rebuilt every forward)": (packed, {"QUANT_NOISE_LOW_MEMORY": "1"}),
            "packed iPQ + w8a8 (int8 or float per layer)": (w8a8, {}),
            "packed iPQ + w8a8, fake-quant reference": (w8a8, {"QUANT_NOISE_INT8_KERNELS": "0"}),
            "dense w8a8 (the trained model)": (dense_w8a8, {})}
    results = {}
    for cpu, cpu_env in CPU_CLASSES.items():
        trials = {name: [] for name in runs}
        for i in range(args.repeat):  # interleaved: a slow moment of the machine hits every checkpoint alike
            for name, (path, env) in runs.items():
                print(f"[{cpu} {i + 1}/{args.repeat}] {name} ...", flush=True)
                result = eval_lm(path, args.data, {**cpu_env, **env})
                result["model_mb"] = logged("MODEL_MB", python(RESIDENT, path, args.data, env={**cpu_env, **env, **FIXED_MMAP}))
                trials[name].append(result)
        results[cpu] = {name: best_of(t) for name, t in trials.items()}
    return results


def sweep_models(data: Path, bench: Path) -> dict:
    """Per shape: (dense, packed, w8a8) files of a random-weight LM put through one iPQ update."""
    schedule = bench / "sweep_schedule.yaml"
    schedule.write_text("defaults:\n  Linear: {block_size: 8, n_centroids: 256}\n  Embedding: {block_size: 8, n_centroids: 256}\n"
                        "kmeans_iterations: 4\nstages:\n  - {name: all, layers: 'decoder\\.(layers\\.\\d+\\.(fc[12]|self_attn\\.(q|k|v|out)_proj)"
                        "|embed_tokens)', updates: 1}\n")
    common = ["--user-dir", PLUGIN, "--optimizer", "adam", "--lr", "0.0001", "--max-tokens", 2048, "--tokens-per-sample", 128,
              "--max-update", 1, "--cpu", "--num-workers", 0, "--no-epoch-checkpoints", "--disable-validation", "--seed", 1]
    models = {}
    for width, layers in SWEEP:
        arch = ["--arch", "qn_transformer_lm", "--decoder-layers", layers, "--decoder-embed-dim", width, "--decoder-ffn-embed-dim",
                4 * width, "--decoder-attention-heads", max(2, width // 64), "--share-decoder-input-output-embed"]
        run = bench / f"sweep_{width}x{layers}"
        if not (run / "ipq" / "checkpoint_last.pt").exists():
            sh(["fairseq-train", data, "--task", "language_modeling", *arch, *common, "--save-dir", run / "train"])
            sh(["fairseq-train", data, "--task", "ipq_language_modeling", "--ipq-config", schedule, "--finetune-from-model",
                run / "train" / "checkpoint_last.pt", *arch, *common, "--save-dir", run / "ipq"])
        files = {"packed": run / "packed.pt", "w8a8": run / "w8a8.pt", "dense": run / "dense.pt"}
        pack(run / "ipq" / "checkpoint_last.pt", files["packed"])
        pack(run / "ipq" / "checkpoint_last.pt", files["w8a8"], "--scalar-bits", 8, "--activation-bits", 8, "--calibrate", data,
             "--calibration-batches", 4)
        if not files["dense"].exists():
            sh(["quant-noise", "unpack", files["packed"], files["dense"]])
        models[(width, layers)] = files
    return models


def sweep_section(args, bench: Path) -> dict:
    models = sweep_models(args.data, bench)
    results = {}
    for cpu, cpu_env in CPU_CLASSES.items():
        trials = {(shape, kind): [] for shape in models for kind in ("dense", "packed", "w8a8")}
        for i in range(args.repeat):
            for (shape, kind) in trials:
                print(f"[{cpu} {i + 1}/{args.repeat}] {shape[0]} wide x {shape[1]} layers, {kind} ...", flush=True)
                out = python(FORWARD, models[shape][kind], args.data, args.batches, env=cpu_env)
                trials[(shape, kind)].append({"tokens_per_s": logged("TOKENS_PER_S", out)})
        results[cpu] = {f"{w}x{l}": {kind: best_of(trials[((w, l), kind)])["tokens_per_s"] for kind in ("dense", "packed", "w8a8")}
                        for (w, l) in models}
    return results


def machine() -> dict:
    out = python("import torch; from quant_noise_plugin.int8_linear import kernel_support as k\n"
                 "print(torch.backends.cpu.get_cpu_capability(), k().activation_bits, sep='|')")
    capability, bits = re.search(r"^(\w+)\|(\w+)$", out, re.M).groups()
    flags = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", flags)
    return {"cpu": model.group(1) if model else "?", "torch_capability": capability, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "native_activation_bits": int(bits) if bits != "None" else None, "cores": os.cpu_count()}


def tables(trained: dict, sweep: dict) -> str:
    lines = []
    for cpu, results in trained.items():
        base = results["dense fp32 (the iPQ model unpacked)"]
        lines += [f"**{cpu}**, the trained LM (fairseq-eval-lm, test split):", "",
                  "| checkpoint | file | model in RAM | peak RSS | tokens/s | vs dense | test ppl |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in results.items():
            lines.append(f"| {name} | {r['file_mb']:.2f} MB | {r['model_mb']:.1f} MB | {r['peak_rss_mb']:.0f} MB | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s'] / base['tokens_per_s']:.3f} | {r['ppl']:.2f} |")
        said = results["packed iPQ + w8a8 (int8 or float per layer)"]["load_line"]
        lines += ["", f"Load line of the w8a8 file: `int8 activations: {said}`", ""]
    for cpu, results in sweep.items():
        lines += [f"**{cpu}**, shape sweep (random weights, one iPQ update; forward tokens/s on test batches of 16 x 128):", "",
                  "| width x layers | dense tokens/s | packed vs dense | w8a8 vs dense |", "|---|---:|---:|---:|"]
        for shape, r in results.items():
            lines.append(f"| {shape} | {r['dense']:,.0f} | {r['packed'] / r['dense']:.3f} | {r['w8a8'] / r['dense']:.3f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs per checkpoint and CPU class; the best speed is kept")
    parser.add_argument("--data", type=Path, default=REPO / "data/lm/bin", help="binarized LM data with the models' dictionary (test split)")
    parser.add_argument("--preset", default="quick", help="with --row: the grid preset (default quick)")
    parser.add_argument("--row", default="qn_pq_0.1", help="an LM row of the grid whose cached runs to use (default: qn_pq_0.1)")
    parser.add_argument("--ipq", type=Path, help="the iPQ checkpoint (default: the row's)")
    parser.add_argument("--trained", type=Path, help="the dense training checkpoint (default: the row's)")
    parser.add_argument("--batches", type=int, default=4, help="sweep: test batches of 2,048 tokens per timed pass")
    parser.add_argument("--no-sweep", action="store_true", help="only the trained LM")
    args = parser.parse_args()
    row_ipq, row_trained = row_checkpoints(args.preset, args.row)
    args.ipq, args.trained, args.data = (args.ipq or row_ipq).resolve(), (args.trained or row_trained).resolve(), args.data.resolve()
    for path in (args.ipq, args.trained):
        if not path.is_file():
            raise SystemExit(f"{path}: no such checkpoint (run `scripts/reproduce.py --preset {args.preset} --lm-modes {args.row} "
                             f"--lm-columns ipq --mt-modes --cls-modes` first, or pass --ipq and --trained)")
    bench = args.ipq.parent / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    info = machine()
    trained = trained_section(args, bench)
    sweep = {} if args.no_sweep else sweep_section(args, bench)
    shown = lambda p: p.relative_to(REPO) if p.is_relative_to(REPO) else Path("...") / p.name  # noqa: E731
    notes = (f"Machine: {info['cpu']}, {info['cores']} cores, torch CPU capability {info['torch_capability']}, "
             f"VNNI {'yes' if info['vnni'] else 'no'} (int8 kernel probe: {info['native_activation_bits']}-bit activations exact). "
             f"Best speed of {args.repeat} interleaved runs, one process per run. \"Model in RAM\": RSS after loading the "
             f"checkpoint and one 16-token forward, minus RSS of the same process just before (imports and dictionary done), with glibc's mmap threshold fixed so that freed blocks leave RSS. Goals: packed "
             f">= 0.98x dense in the default mode; w8a8 >= 1.3x dense on this LM and never below 1.0x on a sweep shape. "
             f"Checkpoints: iPQ `{shown(args.ipq)}`, trained `{shown(args.trained)}`; data `{shown(args.data)}`.")
    write_result("bench_eval_memory", "Compressed LM inference: speed and memory against dense, per CPU class", tables(trained, sweep),
                 notes, {"machine": info, "trained": trained, "sweep": sweep})


if __name__ == "__main__":
    main()
