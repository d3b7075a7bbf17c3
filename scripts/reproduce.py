"""The paper's Table 1 in small, on real text: `make reproduce` (hours on 2 CPU cores).

LM (KJV, perplexity on the test split) and MT (KJV -> RV1909, sacrebleu BLEU on detokenized
fairseq-generate output). Rows are training modes, columns compression methods; every cell is a
real evaluation of a real compressed checkpoint, with its real size on disk. Each training run,
iPQ run and cell is cached under --work by its configuration, and fairseq resumes interrupted
runs, so a rerun continues where it stopped. Writes results/lm_kjv.md, results/mt_en_es.md,
results/size_vs_quality.png and results/reproduce.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import PLUGIN, REPO, device_flags, run_once, sh  # noqa: E402

LM_MODES = {
    "none": [],
    "qat_int4": ["--quant-noise-scalar", "1.0", "--quant-noise-scalar-bits", "4"],
    "qn_pq_0.05": ["--quant-noise-pq", "0.05"],
    "qn_pq_0.1": ["--quant-noise-pq", "0.1"],
    "qn_pq_0.2": ["--quant-noise-pq", "0.2"],
    "qn_scalar_0.5_int4": ["--quant-noise-scalar", "0.5", "--quant-noise-scalar-bits", "4"],
}
COLUMNS = ["fp32", "int8", "int4", "ipq", "ipq+int8"]
MODE_DOC = {
    "none": "no noise",
    "qat_int4": "QAT: every weight int4 fake-quantized each forward (scalar noise P=1, straight-through)",
    "qn_pq_0.05": "Quant-Noise, PQ proxy P=0.05", "qn_pq_0.1": "Quant-Noise, PQ proxy P=0.1 (the paper's LM rate)",
    "qn_pq_0.2": "Quant-Noise, PQ proxy P=0.2", "qn_scalar_0.5_int4": "Quant-Noise, int4 scalar P=0.5",
}


@dataclass
class Preset:
    lm_arch: List[str]
    mt_arch: List[str]
    lm_updates: int
    mt_updates: int
    lm_schedule: str
    mt_schedule: str
    max_tokens: int = 2048
    tokens_per_sample: int = 128
    seed: int = 1
    extra: List[str] = field(default_factory=list)


PRESETS = {
    "full": Preset(
        lm_arch=["--arch", "qn_transformer_lm_small"],
        mt_arch=["--arch", "qn_transformer_small", "--share-all-embeddings"],
        lm_updates=2000, mt_updates=2000,
        lm_schedule="configs/ipq/qn_transformer_lm.yaml", mt_schedule="configs/ipq/qn_transformer.yaml",
    ),
    "quick": Preset(  # the demo's budget: what one session on 2 CPU cores can run (~1.5 h for the default grid)
        lm_arch=["--arch", "qn_transformer_lm_small"],
        mt_arch=["--arch", "qn_transformer_small", "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "2"],
        lm_updates=600, mt_updates=400,
        lm_schedule="configs/ipq/qn_transformer_lm_demo.yaml", mt_schedule="configs/ipq/qn_transformer_demo.yaml",
    ),
    "smoke": Preset(  # tests: a tiny model, a handful of updates
        lm_arch=["--arch", "qn_transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                 "--decoder-attention-heads", "2", "--share-decoder-input-output-embed"],
        mt_arch=["--arch", "qn_transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
                 "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
                 "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings"],
        lm_updates=3, mt_updates=3, lm_schedule="SMOKE", mt_schedule="SMOKE", max_tokens=512, tokens_per_sample=64,
    ),
}

SMOKE_SCHEDULE = """defaults:
  Linear: {block_size: 4, n_centroids: 8}
  Embedding: {block_size: 4, n_centroids: 8}
kmeans_iterations: 3
stages:
  - {name: all, layers: '(encoder|decoder)\\.(layers\\.\\d+\\.(fc[12]|(self_attn|encoder_attn)\\.(q|k|v|out)_proj)|embed_tokens)', updates: 2}
"""


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Runner:
    def __init__(self, args):
        self.args = args
        self.preset = PRESETS[args.preset]
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = Path(args.data).resolve()
        self.command = "scripts/reproduce.py " + " ".join(sys.argv[1:])

    def device_name(self) -> str:
        """What computed a cell: 'cpu' or the CUDA device's name (recorded in each cell, shown in the tables)."""
        if self.args.device == "cpu":
            return "cpu"
        import torch

        return torch.cuda.get_device_name(0)

    def schedule(self, which: str) -> Path:
        """The iPQ schedule for "lm"/"mt": --lm-schedule/--mt-schedule, else the preset's."""
        override = getattr(self.args, f"{which}_schedule")
        if override:
            return Path(override).resolve()
        path = getattr(self.preset, f"{which}_schedule")
        if path == "SMOKE":
            smoke = self.work / "smoke_schedule.yaml"
            smoke.write_text(SMOKE_SCHEDULE)
            return smoke
        return REPO / path

    def common(self, updates: int, save: Path) -> List:
        p = self.preset
        return ["--user-dir", PLUGIN, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "0.5",
                "--max-tokens", p.max_tokens, "--max-update", updates, "--save-dir", save, "--seed", p.seed,
                "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "100",
                "--validate-interval-updates", updates, *device_flags(), "--num-workers", "0", *p.extra]

    # -- training (cached: fairseq resumes from checkpoint_last.pt and stops at --max-update) --

    def train(self, task: str, flags: List[str]) -> Path:
        p = self.preset
        lm = task == "lm"
        arch = p.lm_arch if lm else p.mt_arch
        updates = p.lm_updates if lm else p.mt_updates
        save = self.work / f"{task}-train-{key(arch, flags, updates, p.seed, p.max_tokens)}"
        task_flags = (["--task", "language_modeling", "--tokens-per-sample", p.tokens_per_sample, "--criterion", "cross_entropy",
                       "--lr", "0.001", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", min(400, max(1, updates // 5))]
                      if lm else
                      ["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                       "--lr", "0.0007", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", min(400, max(1, updates // 5))])
        run_once(save, ["fairseq-train", self.data / task / "bin", *task_flags, *arch, *flags, *self.common(updates, save)], "train.log")
        return save / "checkpoint_last.pt"

    def ipq(self, task: str, dense: Path) -> Path:
        p = self.preset
        lm = task == "lm"
        schedule = self.schedule(task)
        from quant_noise_plugin.schedule import load_schedule

        updates = load_schedule(schedule).total_updates
        arch = p.lm_arch if lm else p.mt_arch
        save = dense.parent.parent / f"{dense.parent.name}-ipq-{key(schedule.read_text(), arch)}"
        task_flags = (["--task", "ipq_language_modeling", "--tokens-per-sample", p.tokens_per_sample, "--criterion", "cross_entropy", "--lr", "0.0002"]
                      if lm else
                      ["--task", "ipq_translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--lr", "0.0002"])
        run_once(save, ["fairseq-train", self.data / task / "bin", *task_flags, "--ipq-config", schedule, "--finetune-from-model", dense,
                        *arch, *self.common(updates, save)], "ipq.log")
        return save / "checkpoint_last.pt"

    def compressed(self, task: str, mode: str, column: str) -> Path:
        dense = self.train(task, mode_flags(task, mode))
        base = {"fp32": dense, "int8": dense, "int4": dense}.get(column) or self.ipq(task, dense)
        out = base.parent.parent / f"{base.parent.name}-{column.replace('+', '_')}.pt"  # an iPQ file is named by its run
        if not out.exists():
            if column == "fp32":  # dense, inference-only fp32 (what stock fairseq loads)
                sh(["quant-noise", "unpack", base, out])
            else:
                bits = {"int8": 8, "int4": 4, "ipq+int8": 8}.get(column)
                sh(["quant-noise", "pack", base, out, *(["--scalar-bits", bits] if bits else [])])
        return out

    # -- cells (cached by their configuration) --

    def cell(self, task: str, mode: str, column: str, compute: bool = True) -> Optional[dict]:
        """The cell's cached result, else (when ``compute``) train/compress/evaluate what it needs."""
        p = self.preset
        parts = [asdict(p), mode_flags(task, mode)]
        if column.startswith("ipq"):  # an edited or overridden schedule is another cell
            parts.append(hashlib.sha256(self.schedule(task).read_bytes()).hexdigest())
        cache = self.work / "cells" / f"{task}-{mode}-{column}-{key(*parts)}.json"
        if cache.exists():
            print(f"[cached] {task} {mode} {column}")
            return json.loads(cache.read_text())
        if not compute:
            print(f"[missing] {task} {mode} {column}")
            return None
        path = self.compressed(task, mode, column)
        result = {"task": task, "mode": mode, "column": column, "bytes": path.stat().st_size, "checkpoint": str(path.relative_to(self.work)),
                  "device": self.device_name(), "command": self.command}
        if task == "lm":
            out = sh(["fairseq-eval-lm", self.data / "lm/bin", "--user-dir", PLUGIN, "--path", path, "--gen-subset", "test", *device_flags(),
                      "--tokens-per-sample", p.tokens_per_sample, "--max-tokens", 4096, "--context-window", p.tokens_per_sample // 2])
            result["ppl"] = float(out.rsplit("Perplexity:", 1)[1].split()[0])
        else:
            result["bleu"] = self.bleu(path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result))
        return result

    def bleu(self, path: Path) -> float:
        import sacrebleu

        mt = self.data / "mt"
        out = sh(["fairseq-generate", mt / "bin", "--user-dir", PLUGIN, "--path", path, "--gen-subset", "test", *device_flags(),
                  "--beam", 4, "--max-tokens", 4000, "--bpe", "sentencepiece", "--sentencepiece-model", mt / "spm.bpe.model"])
        hyps = {}
        for line in out.splitlines():
            if line.startswith("D-"):
                idx, _, text = line[2:].split("\t", 2)
                hyps[int(idx)] = text
        refs = (mt / "raw" / "test.es").read_text(encoding="utf-8").splitlines()
        ordered = [hyps.get(i, "") for i in range(len(refs))]
        return sacrebleu.corpus_bleu(ordered, [refs]).score


MT_MODES = {"none": [], "qn_pq_0.1": ["--quant-noise-pq", "0.1"]}
MT_COLUMNS = ["fp32", "int8", "ipq"]


def mode_flags(task: str, mode: str) -> List[str]:
    """The fairseq-train flags of a training mode (a row) of the LM or MT grid."""
    return (LM_MODES if task == "lm" else MT_MODES)[mode]


def render(results: List[dict], task: str, modes: List[str], columns: List[str], runner: Runner) -> str:
    metric = "ppl" if task == "lm" else "bleu"
    cells = {(r["mode"], r["column"]): r for r in results if r["task"] == task}
    fp32 = {m: cells[(m, "fp32")]["bytes"] for m in modes if (m, "fp32") in cells}
    head = "| training \\ compression | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for m in modes:
        row = [f"| {m} |"]
        for c in columns:
            r = cells.get((m, c))
            if r is None:
                row.append(" – |")
                continue
            ratio = f", x{fp32[m] / r['bytes']:.0f}" if m in fp32 else ""
            row.append(f" {r[metric]:.2f} ({r['bytes'] / 1e6:.2f} MB{ratio}) |")
        lines.append("".join(row))
    p = runner.preset
    legend = "\n".join(f"- `{m}`: {MODE_DOC.get(m, m)}: `{' '.join(mode_flags(task, m)) or '(no flags)'}`" for m in modes)
    title = "Perplexity on the KJV test split (lower is better)" if task == "lm" else "BLEU (sacrebleu, detokenized) on the KJV->RV1909 test split"
    return (
        f"# {title}\n\nEach cell: {metric} (size on disk of the compressed checkpoint, compression ratio vs the fp32 one). "
        f"Every number is a real `fairseq-eval-lm`/`fairseq-generate` run on that checkpoint.\n\n" + "\n".join(lines) +
        f"\n\nTraining modes:\n{legend}\n\nColumns: fp32 = dense inference checkpoint (`quant-noise unpack`); int8/int4 = every "
        f"Linear/Embedding weight as int codes with per-row scales, rest fp16 (`quant-noise pack --scalar-bits`); iPQ = "
        f"`--task ipq_*` with `{shown(runner.schedule(task))}`, packed; iPQ+int8 = the same, centroids and remaining layers int8.\n\n"
        f"Preset `{runner.args.preset}`: arch `{' '.join(getattr(p, task + '_arch'))}`, {getattr(p, task + '_updates')} training updates, "
        f"--max-tokens {p.max_tokens}, seed {p.seed}.\n\nCells computed by:\n{provenance(cells.values())}\n\nCommand: `{runner.command}`\n"
    )


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def provenance(cells) -> str:
    """One line per (device, command) that computed some of the cells: a table may merge several runs."""
    runs = {}
    for r in cells:
        runs.setdefault((r.get("device", "not recorded"), r.get("command", "not recorded")), []).append(r["mode"])
    return "\n".join(f"- {device}: `{command}` ({', '.join(sorted(set(modes)))})" for (device, command), modes in runs.items())


def plot(results: List[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    tasks = [t for t in ("lm", "mt") if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "ppl" if task == "lm" else "bleu"
        for mode in sorted({r["mode"] for r in results if r["task"] == task}):
            pts = sorted((r["bytes"] / 1e6, r[metric]) for r in results if r["task"] == task and r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: they overlap otherwise
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel("test perplexity" if task == "lm" else "BLEU")
        ax.set_title("KJV language model" if task == "lm" else "KJV -> RV1909 translation")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--work", default=str(REPO / "work_dirs" / "reproduce"))
    parser.add_argument("--results", default=str(REPO / "results"))
    parser.add_argument("--lm-modes", nargs="*", default=list(LM_MODES))
    parser.add_argument("--lm-columns", nargs="*", default=COLUMNS)
    parser.add_argument("--mt-modes", nargs="*", default=list(MT_MODES))
    parser.add_argument("--mt-columns", nargs="*", default=MT_COLUMNS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=os.environ.get("QN_DEVICE", "cpu"), help="where fairseq runs")
    parser.add_argument("--lm-schedule", help="iPQ schedule YAML for the LM grid (default: the preset's)")
    parser.add_argument("--mt-schedule", help="iPQ schedule YAML for the MT grid (default: the preset's)")
    parser.add_argument("--render-only", action="store_true",
                        help="compute nothing: tables and plot from the cells cached under --work (e.g. cells copied from another machine)")
    args = parser.parse_args(argv)
    os.environ["QN_DEVICE"] = args.device
    from quant_noise_plugin.schedule import ScheduleError, load_schedule

    for flag in ("lm_schedule", "mt_schedule"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')}: no such file {path}")
        try:
            if path:
                load_schedule(path)  # a bad schedule fails here, in one line, not hours into the grid
        except ScheduleError as error:
            parser.error(f"--{flag.replace('_', '-')}: {error}")
    for m in args.lm_modes:
        if m not in LM_MODES:
            parser.error(f"--lm-modes: unknown mode {m!r} (known: {', '.join(LM_MODES)})")
    for m in args.mt_modes:
        if m not in MT_MODES:
            parser.error(f"--mt-modes: unknown mode {m!r} (known: {', '.join(MT_MODES)})")
    if not args.render_only and not (Path(args.data) / ".complete.json").exists():
        sh(["quant-noise", "data", "--output", args.data])
    runner = Runner(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    grid = [("lm", m, c) for m in args.lm_modes for c in args.lm_columns] + [("mt", m, c) for m in args.mt_modes for c in args.mt_columns]
    results = []
    for task, mode, column in grid:
        result = runner.cell(task, mode, column, compute=not args.render_only)
        if result is not None:
            results.append(result)
            write_outputs(results, args, runner, out)  # partial tables as the grid fills
    for name in ("lm_kjv.md", "mt_en_es.md"):
        if (out / name).exists():
            print((out / name).read_text())


def write_outputs(results: List[dict], args, runner: Runner, out: Path) -> None:
    if any(r["task"] == "lm" for r in results):
        (out / "lm_kjv.md").write_text(render(results, "lm", args.lm_modes, args.lm_columns, runner))
    if any(r["task"] == "mt" for r in results):
        (out / "mt_en_es.md").write_text(render(results, "mt", args.mt_modes, args.mt_columns, runner))
    (out / "reproduce.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "size_vs_quality.png")

if __name__ == "__main__":
    main()
