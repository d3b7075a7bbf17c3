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
3. Generation (``--sections generation``, its own results/bench_eval_memory_generation.{md,json,png}): the hub's
   greedy ``generate`` (fairseq's SequenceGenerator, incremental decoding, batch 1), up to 128 new tokens after a
   32-token prompt of the test split, for the demo LM and the paper-scale LM (``--generate LABEL CKPT DATA``;
   default: `make demo`'s packed file and bench_paper_scale.py's): dense fp32 (unpacked) against the packed file
   in each QUANT_NOISE_INFERENCE mode (decoded, auto, codes). Tokens/s, the model's RAM and the bytes of the
   tensors it holds, and whether its top-1 tokens equal the decoded model's.

Each CPU class runs every checkpoint in its own process, interleaved and repeated; best speed kept. "AVX2
without VNNI" is this CPU with oneDNN, MKL and ATen limited to AVX2 (their own switches,
``ONEDNN_MAX_CPU_ISA=AVX2`` etc.): the int8 kernel's arithmetic of that class, not its clock or caches.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
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
CPU_CLASSES = {"this CPU": {}, "AVX2 without VNNI (emulated)": AVX2_WITHOUT_VNNI}
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
from quant_noise_plugin import lut
from quant_noise_plugin.inference import held_tensor_bytes
if lut.numba_enabled():  # numba's runtime is a library, loaded before the baseline (as fairseq's)
    lut.lut_linear(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.uint8))
gc.collect()
before = rss_mb()
models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data}, task=task)
model = models[0].eval()
with torch.no_grad():
    model(torch.arange(4, 20).reshape(1, 16))  # a tiny batch: decoded weights and int8 packs built, no big activations
gc.collect()
print("MODEL_MB", rss_mb() - before)
print("TENSOR_MB", held_tensor_bytes(model) / 1e6)
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


GENERATE = """
import gc, json, os, sys, time, torch
from fairseq.models.transformer_lm import TransformerLanguageModel
from quant_noise_plugin.inference import held_tensor_bytes
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
path, data, plugin, n_prompt, n_new, n_prompts = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
import quant_noise_plugin
from quant_noise_plugin import lut
if lut.numba_enabled():  # numba's runtime (~115 MB RSS) is a library, loaded before the baseline in every run
    lut.lut_linear(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.uint8))
gc.collect()
before = rss_mb()
hub = TransformerLanguageModel.from_pretrained(os.path.dirname(path), os.path.basename(path), data_name_or_path=data, user_dir=plugin)
hub.eval()
n_new = min(n_new, hub.max_positions - n_prompt - 2 if isinstance(hub.max_positions, int) else n_new)
hub.task.load_dataset("test")
test = hub.task.dataset("test")
stream = torch.cat([test[i]["source"] for i in range(min(len(test), 64))])
stream = stream[stream != hub.task.source_dictionary.eos()]
prompts = [stream[i * n_prompt:(i + 1) * n_prompt] for i in range(n_prompts)]
hub.generate(prompts[0][:8], beam=1, max_len_b=12, min_len=12)  # warm-up: kernels compiled and measured
best, greedy = float("inf"), []
for prompt in prompts:
    start = time.perf_counter()
    tokens = hub.generate(prompt, beam=1, max_len_b=n_prompt + n_new, min_len=n_prompt + n_new)[0]["tokens"]
    best = min(best, time.perf_counter() - start)
    greedy.append(tokens[n_prompt:].tolist())
gc.collect()
print("NEW_TOKENS", len(greedy[0]))
print("TOKENS_PER_S", len(greedy[0]) / best)
print("MODEL_MB", rss_mb() - before)
print("TENSOR_MB", held_tensor_bytes(hub.models[0]) / 1e6)
print("GREEDY", json.dumps(greedy))
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
    for key in ("peak_rss_mb", "model_mb", "tensor_mb"):
        if key in best:
            best[key] = min(t[key] for t in trials)
    return best


def trained_section(args, bench: Path) -> dict:
    ipq, trained = args.ipq, args.trained
    data = ["--data", args.data]  # checkpoints trained elsewhere name a data directory this machine may not have
    calibrate = ["--scalar-bits", 8, "--activation-bits", 8, "--calibrate", args.data, *data]
    packed, w8a8, dense_w8a8, dense = (bench / name for name in ("ipq.packed.pt", "ipq_w8a8.packed.pt", "dense_w8a8.packed.pt", "ipq.dense.pt"))
    pack(ipq, packed, *data)
    pack(ipq, w8a8, *calibrate)
    pack(trained, dense_w8a8, *calibrate)
    if not dense.exists():
        sh(["quant-noise", "unpack", packed, dense, *data])
    runs = {"dense fp32 (the iPQ model unpacked)": (dense, {}),
            "packed iPQ, decoded once (QUANT_NOISE_INFERENCE=decoded: the default before codes)": (packed, {"QUANT_NOISE_INFERENCE": "decoded"}),
            "packed iPQ, auto (default)": (packed, {"QUANT_NOISE_INFERENCE": "auto"}),
            "packed iPQ, codes only (QUANT_NOISE_INFERENCE=codes)": (packed, {"QUANT_NOISE_INFERENCE": "codes"}),
            "packed iPQ, low memory (rebuilt every forward)": (packed, {"QUANT_NOISE_LOW_MEMORY": "1", "QUANT_NOISE_INFERENCE": "decoded"}),
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
                resident = python(RESIDENT, path, args.data, env={**cpu_env, **env, **FIXED_MMAP})
                result["model_mb"], result["tensor_mb"] = logged("MODEL_MB", resident), logged("TENSOR_MB", resident)
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
        pack(run / "ipq" / "checkpoint_last.pt", files["packed"], "--data", data)
        pack(run / "ipq" / "checkpoint_last.pt", files["w8a8"], "--scalar-bits", 8, "--activation-bits", 8, "--calibrate", data,
             "--calibration-batches", 4, "--data", data)
        if not files["dense"].exists():
            sh(["quant-noise", "unpack", files["packed"], files["dense"], "--data", data])
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


GENERATION_MODES = {"dense fp32 (unpacked)": ("dense", {}), "packed, decoded": ("packed", {"QUANT_NOISE_INFERENCE": "decoded"}),
                    "packed, auto (default)": ("packed", {"QUANT_NOISE_INFERENCE": "auto"}),
                    "packed, codes": ("packed", {"QUANT_NOISE_INFERENCE": "codes"})}


def default_generation_models(args) -> list:
    """`make demo`'s packed LM (under ``--demo-work``) and bench_paper_scale.py's, where they exist."""
    grid, models = load_grid(), []
    demo = grid.experiments["demo"]
    with contextlib.redirect_stdout(io.StringIO()):  # the runner's dry run prints its commands
        packed = Runner(grid, demo.preset, None, args.demo_work, REPO / "data", dry_run=True).compressed(demo.task, demo.modes[0], demo.columns[1])
    models.append(("demo LM", packed, REPO / "data/lm/bin"))
    paper = REPO / "work_dirs/paper_scale/lm"
    models.append(("paper-scale LM (qn_transformer_lm_wiki103, iPQ x25)", paper / "packed.pt", paper / "bin"))
    return [(label, Path(path), Path(data)) for label, path, data in models if Path(path).is_file()]


def generation_section(args) -> dict:
    models = [(label, Path(path).resolve(), Path(data).resolve()) for label, path, data in args.generate] if args.generate \
        else default_generation_models(args)
    if not models:
        raise SystemExit("no model to generate with: run `make demo` and benchmarks/bench_paper_scale.py, or pass --generate LABEL CKPT DATA")
    results = {}
    for label, path, data in models:
        packed, dense = path, path.with_name(path.stem + ".dense.pt")
        if not dense.exists():
            sh(["quant-noise", "unpack", packed, dense, "--data", data])
        files = {"dense": dense, "packed": packed}
        with zipfile.ZipFile(packed) as archive:  # the tensor records of the file (each storage once)
            packed_tensor_mb = sum(i.file_size for i in archive.infolist() if "/data/" in i.filename) / 1e6
        results[label] = {"file_mb": {k: v.stat().st_size / 1e6 for k, v in files.items()}, "packed_tensor_mb": packed_tensor_mb,
                          "prompt_tokens": args.prompt_tokens, "cpus": {}}
        for cpu, cpu_env in CPU_CLASSES.items():
            trials = {name: [] for name in GENERATION_MODES}
            for i in range(args.repeat):
                for name, (kind, env) in GENERATION_MODES.items():
                    print(f"[{label}, {cpu} {i + 1}/{args.repeat}] {name} ...", flush=True)
                    out = python(GENERATE, files[kind], data, PLUGIN, args.prompt_tokens, args.new_tokens, args.prompts,
                                 env={**cpu_env, **env, **FIXED_MMAP})
                    trials[name].append({"tokens_per_s": logged("TOKENS_PER_S", out), "model_mb": logged("MODEL_MB", out),
                                         "tensor_mb": logged("TENSOR_MB", out), "new_tokens": int(logged("NEW_TOKENS", out)),
                                         "greedy": json.loads(out.rsplit("GREEDY ", 1)[1].splitlines()[0])})
            best = {name: best_of(t) for name, t in trials.items()}
            for name, r in best.items():
                r["tensor_mb"] = min(t["tensor_mb"] for t in trials[name])
                r["same_top1_as_decoded"] = all(t["greedy"] == best["packed, decoded"]["greedy"] for t in trials[name])
            results[label]["cpus"][cpu] = best
    return results


def generation_table(results: dict) -> str:
    lines = []
    for label, model in results.items():
        for cpu, rows in model["cpus"].items():
            base = rows["dense fp32 (unpacked)"]
            lines += [f"**{label}**, {cpu}: batch 1, {base['new_tokens']} new tokens after a {base.get('prompt', 32)}-token prompt "
                      f"(packed file {model['file_mb']['packed']:.2f} MB, dense {model['file_mb']['dense']:.2f} MB)", "",
                      "| model | tokens/s | vs dense | model in RAM | tensors held | vs the packed file's tensors | top-1 = decoded |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            for name, r in rows.items():
                lines.append(f"| {name} | {r['tokens_per_s']:,.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['model_mb']:.1f} MB | "
                             f"{r['tensor_mb']:.3f} MB | {r['tensor_mb'] / model['packed_tensor_mb']:.2f}x | "
                             f"{'yes' if r['same_top1_as_decoded'] else 'no'} |")
            lines.append("")
    return "\n".join(lines).rstrip()


def generation_plot(results: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (label, model) in zip(axes[0], results.items()):
        for cpu, marker in zip(model["cpus"], "os"):
            for name, r in model["cpus"][cpu].items():
                ax.scatter(r["model_mb"], r["tokens_per_s"], marker=marker, label=f"{name}, {cpu}")
        ax.set_xscale("log")
        ax.set_xlabel("model in RAM (MB, log)")
        ax.set_ylabel("tokens/s (batch 1, greedy)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


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
                  "| checkpoint | file | model in RAM | tensors held | peak RSS | tokens/s | vs dense | test ppl |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in results.items():
            held = f"{r['tensor_mb']:.2f} MB" if "tensor_mb" in r else "-"
            lines.append(f"| {name} | {r['file_mb']:.2f} MB | {r['model_mb']:.1f} MB | {held} | {r['peak_rss_mb']:.0f} MB | {r['tokens_per_s']:,.0f} | "
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
    parser.add_argument("--no-sweep", action="store_true", help="only the trained LM (same as --sections trained)")
    parser.add_argument("--sections", nargs="+", choices=("trained", "sweep", "generation"), default=["trained", "sweep", "generation"],
                        help="what to run (default all); trained and sweep write bench_eval_memory.*, generation its own file")
    parser.add_argument("--generate", nargs=3, action="append", metavar=("LABEL", "CKPT", "DATA"),
                        help="generation: a packed LM (quant-noise pack) and its data directory (repeatable; default: the demo's "
                             "and the paper-scale LM's)")
    parser.add_argument("--demo-work", type=Path, default=REPO / "work_dirs/reproduce", help="where `make demo` ran (its --work)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128, help="at most; fewer where the model has fewer positions")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per run (the best speed kept; all compared for top-1)")
    args = parser.parse_args()
    sections = ["trained"] if args.no_sweep else args.sections
    args.data = args.data.resolve()
    if "generation" in sections:
        generation = generation_section(args)
        notes = (f"Machine: {machine()['cpu']}, {os.cpu_count()} cores. Best speed of {args.repeat} interleaved runs, one process per "
                 "run, each generating from every prompt with the hub's `generate(beam=1)` (fairseq's SequenceGenerator, incremental "
                 "decoding); the time includes the prompt's forward. \"Model in RAM\": RSS after loading and generating, minus RSS "
                 "before loading (imports done, numba's runtime loaded: ~115 MB of RSS for any model; glibc's mmap threshold fixed). \"Tensors held\": bytes of the model's parameters, "
                 "buffers and inference caches (quant_noise_plugin.inference.held_tensor_bytes). The AVX2 class also compiles "
                 "the numba kernel for Haswell (NUMBA_CPU_NAME).")
        write_result("bench_eval_memory_generation", "Token-by-token generation from packed LMs: speed and memory per inference mode",
                     generation_table(generation), notes, generation)
        generation_plot(generation, REPO / "results" / "bench_eval_memory_generation.png")
    if "trained" not in sections and "sweep" not in sections:
        return
    row_ipq, row_trained = row_checkpoints(args.preset, args.row)
    args.ipq, args.trained = (args.ipq or row_ipq).resolve(), (args.trained or row_trained).resolve()
    for path in (args.ipq, args.trained):
        if not path.is_file():
            raise SystemExit(f"{path}: no such checkpoint (run `scripts/reproduce.py --preset {args.preset} --lm-modes {args.row} "
                             f"--lm-columns ipq --mt-modes --cls-modes` first, or pass --ipq and --trained)")
    bench = args.ipq.parent / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    info = machine()
    trained = trained_section(args, bench) if "trained" in sections else {}
    sweep = sweep_section(args, bench) if "sweep" in sections else {}
    previous = REPO / "results" / "bench_eval_memory.json"
    kept = [] if not previous.exists() else [name for name, value in (("trained", trained), ("sweep", sweep)) if not value]
    if kept:  # a section not rerun keeps its last results, said so in the notes
        old = json.loads(previous.read_text())
        trained, sweep = trained or old.get("trained", {}), sweep or old.get("sweep", {})
    shown = lambda p: p.relative_to(REPO) if p.is_relative_to(REPO) else Path("...") / p.name  # noqa: E731
    notes = (f"Machine: {info['cpu']}, {info['cores']} cores, torch CPU capability {info['torch_capability']}, "
             f"VNNI {'yes' if info['vnni'] else 'no'} (int8 kernel probe: {info['native_activation_bits']}-bit activations exact). "
             f"Best speed of {args.repeat} interleaved runs, one process per run. \"Model in RAM\": RSS after loading the "
             f"checkpoint and one 16-token forward, minus RSS of the same process just before (imports and dictionary done), with glibc's mmap threshold fixed so that freed blocks leave RSS. Goals: packed "
             f">= 0.98x dense in the default mode; w8a8 >= 1.3x dense on this LM and never below 1.0x on a sweep shape. "
             f"Checkpoints: iPQ `{shown(args.ipq)}`, trained `{shown(args.trained)}`; data `{shown(args.data)}`."
             + (f" Not rerun by this command (kept from the file's previous run, its own command and model): {', '.join(kept)}."
                if kept else ""))
    write_result("bench_eval_memory", "Compressed LM inference: speed and memory against dense, per CPU class", tables(trained, sweep),
                 notes, {"machine": info, "trained": trained, "sweep": sweep})


if __name__ == "__main__":
    main()
