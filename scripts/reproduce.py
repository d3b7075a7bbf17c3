"""The paper's Table 1 in small, on real text: `make reproduce` (hours on 2 CPU cores).

LM (KJV, perplexity) and MT (KJV -> RV1909, sacrebleu BLEU on detokenized fairseq-generate
output). Rows are training modes, columns compression methods; every cell is a real evaluation
of a real compressed checkpoint, on the valid split (to choose) and the test split (to report),
with its real size on disk, for each seed. Each training run, iPQ run and cell is cached under
--work by its configuration, and fairseq resumes interrupted runs, so a rerun continues where it
stopped. Writes results/lm_kjv.md, results/mt_en_es.md, results/size_vs_quality.png and
results/reproduce.json; with --table ablation, results/ablation_noise.md (every lever, both seeds,
valid and test, both iPQ schedules, against the equal-budget dense control).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import PLUGIN, REPO, device_flags, run_once, sh  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """A row: how the model is trained before it is compressed.

    ``updates``: "preset" (the preset's training budget), "preset+ipq" (plus the iPQ schedule's
    updates: the equal-budget dense control), or "N%" of the preset's budget. With ``base``, the
    run finetunes that mode's trained model (``--finetune-from-model``) for ``updates`` more.
    Flags may hold "{N%}", replaced by N% of the row's own training updates. ``ipq_flags`` go to
    the iPQ runs of the row (the no-noise and QAT rows have none).
    """

    flags: Tuple[str, ...] = ()
    doc: str = ""
    base: Optional[str] = None
    updates: str = "preset"
    ipq_flags: Tuple[str, ...] = ()  # added to the iPQ runs (e.g. noise on the layers not quantized yet)


QN = "--quant-noise-pq"
LM_MODES: Dict[str, Mode] = {
    "none": Mode((), "no noise"),
    "qat_int4": Mode(("--quant-noise-scalar", "1.0", "--quant-noise-scalar-bits", "4"),
                     "QAT: every weight int4 fake-quantized each forward (scalar noise P=1, straight-through)"),
    "qn_pq_0.05": Mode((QN, "0.05"), "Quant-Noise, PQ proxy P=0.05 on every layer"),
    "qn_pq_0.1": Mode((QN, "0.1"), "Quant-Noise, PQ proxy P=0.1 on every layer (the paper's LM rate)"),
    "qn_pq_0.2": Mode((QN, "0.2"), "Quant-Noise, PQ proxy P=0.2 on every layer"),
    "qn_scalar_0.5_int4": Mode(("--quant-noise-scalar", "0.5", "--quant-noise-scalar-bits", "4"), "Quant-Noise, int4 scalar P=0.5"),
    # the noise ablation (results/ablation_noise.md)
    "none_long": Mode((), "dense control: no noise, trained for the preset's updates plus the iPQ schedule's", updates="preset+ipq"),
    "qat_int4_long": Mode(("--quant-noise-scalar", "1.0", "--quant-noise-scalar-bits", "4"),
                          "QAT control (as qat_int4), trained as long as the dense control (none_long)", updates="preset+ipq"),
    "qn_pq_0.1_no_out": Mode((QN, "0.1", "--quant-noise-exclude", "output_projection"),
                             "P=0.1, not on the output softmax (the tied embedding is noised as the input lookup only)"),
    "qn_pq_0.1_no_emb": Mode((QN, "0.1", "--quant-noise-exclude", "embed_tokens|output_projection"),
                             "P=0.1 on the Linear layers only, as fairseq places it"),
    "qn_emb_0.1": Mode((QN, "0", "--quant-noise-pq-embeddings", "0.1"), "P=0.1 on the tied embedding only (lookup and softmax)"),
    "qn_pq_0.1_late": Mode((QN, "0.1", "--quant-noise-start-update", "{50%}", "--quant-noise-ramp-updates", "{25%}"),
                           "P=0.1 on every layer, off for the first half of training, then ramped up over a quarter"),
    "qn_centroids_0.1": Mode((QN, "0.1", "--quant-noise-pq-centroids", "256"),
                             "P=0.1 on every layer, selected blocks replaced by their nearest of 256 k-means centroids (the real PQ error)"),
    "qn_centroids_0.3": Mode((QN, "0.3", "--quant-noise-pq-centroids", "256"), "as qn_centroids_0.1 with P=0.3"),
    "qn_emb_centroids_0.2": Mode((QN, "0", "--quant-noise-pq-embeddings", "0.2", "--quant-noise-pq-centroids", "1024"),
                                 "the tied embedding only (lookup and softmax), P=0.2 of its blocks replaced by their nearest of 1024 "
                                 "centroids: the error the embeddings-first K=1024 schedule will make"),
    "qn_emb_centroids_0.2_late": Mode((QN, "0", "--quant-noise-pq-embeddings", "0.2", "--quant-noise-pq-centroids", "1024",
                                       "--quant-noise-start-update", "{50%}", "--quant-noise-ramp-updates", "{25%}"),
                                      "as qn_emb_centroids_0.2, off for the first half, then ramped up over a quarter"),
    "qn_pq_0.1_late_long": Mode((QN, "0.1", "--quant-noise-start-update", "{50%}", "--quant-noise-ramp-updates", "{25%}"),
                                "as qn_pq_0.1_late, trained as long as the dense control (none_long)", updates="preset+ipq"),
    "qn_centroids_0.1_late_long": Mode((QN, "0.1", "--quant-noise-pq-centroids", "256", "--quant-noise-start-update", "{50%}",
                                        "--quant-noise-ramp-updates", "{25%}"),
                                       "as qn_centroids_0.1_late, trained as long as the dense control (none_long)", updates="preset+ipq"),
    "qn_centroids_0.05_late_long": Mode((QN, "0.05", "--quant-noise-pq-centroids", "256", "--quant-noise-start-update", "{50%}",
                                         "--quant-noise-ramp-updates", "{25%}"),
                                        "as qn_centroids_0.1_late_long at half the rate", updates="preset+ipq"),
    "qn_centroids_0.1_late": Mode((QN, "0.1", "--quant-noise-pq-centroids", "256", "--quant-noise-start-update", "{50%}",
                                   "--quant-noise-ramp-updates", "{25%}"), "centroid noise P=0.1, off for the first half, then ramped up over a quarter"),
    "qn_pq_0.05_late": Mode((QN, "0.05", "--quant-noise-start-update", "{50%}", "--quant-noise-ramp-updates", "{25%}"),
                            "P=0.05 on every layer, off for the first half, then ramped up over a quarter"),
    "none_ipq_qn_0.1": Mode((), "the `none` model; its iPQ runs noise the layers not quantized yet (P=0.1), as fairseq's iPQ does",
                            ipq_flags=(QN, "0.1")),
    "ft_none": Mode((), "control of ft_qn_pq_0.1: the `none` model trained a third more, without noise", base="none", updates="33%"),
    "ft_qn_pq_0.1": Mode((QN, "0.1"), "Quant-Noise as finetuning: the `none` model, then a third more updates with P=0.1", base="none", updates="33%"),
}
MT_MODES: Dict[str, Mode] = {
    "none": LM_MODES["none"],
    "qn_pq_0.1": LM_MODES["qn_pq_0.1"],
    "none_long": LM_MODES["none_long"],
}
CLS_MODES: Dict[str, Mode] = {  # the encoder is pretrained once without noise (masked LM); the rows differ in finetuning
    "none": LM_MODES["none"],
    "qat_int4": LM_MODES["qat_int4"],
    "qn_pq_0.1": LM_MODES["qn_pq_0.1"],
    "qn_centroids_0.1_late": Mode(LM_MODES["qn_centroids_0.1_late"].flags + ("--quant-noise-exclude", r"classification_heads\.\w+\.out_proj"),
                                  "the LM ablation's best attempt (results/ablation_noise.md): centroid noise P=0.1, off for the first half, "
                                  "then ramped up over a quarter; not on the 3-way output layer, which iPQ leaves dense"),
}
COLUMNS = ["fp32", "int8", "int4", "w8a8", "ipq", "ipq+int8", "ipq+w8a8"]
CLS_COLUMNS = ["fp32", "int8", "ipq", "ipq+int8"]
MT_COLUMNS = ["fp32", "int8", "w8a8", "ipq", "ipq+w8a8"]
SCHEDULE_COLUMNS = ("ipq", "ipq_k1024")  # a column "<schedule column>[+int8|+w8a8]" is that schedule's iPQ model, packed
DENSE_COLUMNS = ("fp32", "int8", "int4", "w8a8")
CALIBRATION = ["--calibration-batches", "32", "--observer", "mse"]  # w8a8: int8 weights and calibrated int8 activations
FINETUNE_LR_FACTOR = 0.5  # finetuning rows (and their controls) run at half the preset's peak learning rate


@dataclass
class Preset:
    lm_arch: List[str]
    mt_arch: List[str]
    lm_updates: int
    mt_updates: int
    lm_schedule: str
    mt_schedule: str
    lm_schedule_k1024: str = ""  # the embeddings-first schedule with 1024 embedding centroids (column ipq_k1024)
    cls_arch: List[str] = field(default_factory=lambda: ["--arch", "qn_roberta_small"])
    cls_pretrain_updates: int = 0  # masked-LM pretraining of the encoder on the LM data
    cls_updates: int = 0  # sentence-pair classification finetuning
    cls_schedule: str = ""
    cls_max_positions: int = 128
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
        lm_schedule_k1024="configs/ipq/qn_transformer_lm_embfirst_k1024.yaml",
        cls_pretrain_updates=4000, cls_updates=2000, cls_schedule="configs/ipq/qn_roberta_cls.yaml",
    ),
    "quick": Preset(  # the demo's budget: what one session on 2 CPU cores can run (~1.5 h for the default grid)
        lm_arch=["--arch", "qn_transformer_lm_small"],
        mt_arch=["--arch", "qn_transformer_small", "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "2"],
        lm_updates=600, mt_updates=400,
        lm_schedule="configs/ipq/qn_transformer_lm_demo.yaml", mt_schedule="configs/ipq/qn_transformer_demo.yaml",
        lm_schedule_k1024="configs/ipq/qn_transformer_lm_demo_embfirst_k1024.yaml",
        cls_pretrain_updates=1000, cls_updates=600, cls_schedule="configs/ipq/qn_roberta_cls_demo.yaml",
    ),
    "smoke": Preset(  # tests: a tiny model, a handful of updates
        lm_arch=["--arch", "qn_transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                 "--decoder-attention-heads", "2", "--share-decoder-input-output-embed"],
        mt_arch=["--arch", "qn_transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
                 "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
                 "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings"],
        lm_updates=3, mt_updates=3, lm_schedule="SMOKE", mt_schedule="SMOKE", lm_schedule_k1024="SMOKE_K",
        cls_arch=["--arch", "qn_roberta_tiny", "--encoder-layers", "1", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64"],
        cls_pretrain_updates=3, cls_updates=3, cls_schedule="SMOKE_CLS", cls_max_positions=64,
        max_tokens=512, tokens_per_sample=64,
    ),
}

SMOKE_SCHEDULES = {
    "SMOKE": """defaults:
  Linear: {block_size: 4, n_centroids: 8}
  Embedding: {block_size: 4, n_centroids: 8}
kmeans_iterations: 3
stages:
  - {name: all, layers: '(encoder|decoder)\\.(layers\\.\\d+\\.(fc[12]|(self_attn|encoder_attn)\\.(q|k|v|out)_proj)|embed_tokens)', updates: 2}
""",
    "SMOKE_K": """defaults:
  Linear: {block_size: 4, n_centroids: 8}
  Embedding: {block_size: 4, n_centroids: 16}
kmeans_iterations: 3
stages:
  - {name: embeddings, layers: 'decoder\\.embed_tokens', updates: 1}
  - {name: rest, layers: 'decoder\\.layers\\.\\d+\\.(fc[12]|self_attn\\.(q|k|v|out)_proj)', updates: 1}
""",
    "SMOKE_CLS": """defaults:
  Linear: {block_size: 4, n_centroids: 8}
  Embedding: {block_size: 4, n_centroids: 8}
kmeans_iterations: 3
stages:
  - {name: all, layers: 'encoder\\.(sentence_encoder\\.(embed_tokens|layers\\.\\d+\\.(fc[12]|self_attn\\.(q|k|v|out)_proj))|lm_head\\.dense)', updates: 2}
""",
}


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def modes_of(task: str) -> Dict[str, Mode]:
    return {"lm": LM_MODES, "mt": MT_MODES, "cls": CLS_MODES}[task]


CLS_TASK = ["--num-classes", 3, "--init-token", 0, "--separator-token", 2, "--shorten-method", "truncate"]
TASK_FLAGS = {  # fairseq-train flags of each task's training and iPQ runs (lr and schedule aside)
    "lm": (["--task", "language_modeling", "--criterion", "cross_entropy"], ["--task", "ipq_language_modeling", "--criterion", "cross_entropy"]),
    "mt": (["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", 0.1],
           ["--task", "ipq_translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", 0.1]),
    "cls": (["--task", "sentence_prediction", "--criterion", "sentence_prediction", *CLS_TASK],
            ["--task", "ipq_sentence_prediction", "--criterion", "sentence_prediction", *CLS_TASK]),
}
PEAK_LR = {"lm": 0.001, "mt": 0.0007, "cls": 0.0002}


def split_column(column: str) -> Tuple[str, Optional[str]]:
    """"ipq_k1024+int8" -> ("ipq_k1024", "int8"); "int4" -> ("int4", None)."""
    base, _, suffix = column.partition("+")
    return base, suffix or None


def valid_column(task: str, column: str) -> bool:
    method, suffix = split_column(column)
    if method in DENSE_COLUMNS:
        return suffix is None
    return method in SCHEDULE_COLUMNS and suffix in (None, "int8", "w8a8") and not (method == "ipq_k1024" and task != "lm")


class Runner:
    def __init__(self, args, seed: Optional[int] = None):
        self.args = args
        self.preset = PRESETS[args.preset] if seed is None else replace(PRESETS[args.preset], seed=seed)
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

    def schedule(self, task: str, column: str = "ipq") -> Path:
        """The iPQ schedule of an iPQ column: --lm-schedule/--mt-schedule for "ipq", else the preset's."""
        if column == "ipq" and getattr(self.args, f"{task}_schedule"):
            return Path(getattr(self.args, f"{task}_schedule")).resolve()
        if column == "ipq_k1024" and task != "lm":
            raise SystemExit(f"column {column} exists for the LM only")
        path = getattr(self.preset, f"{task}_schedule" if column == "ipq" else f"{task}_schedule_k1024")
        if path in SMOKE_SCHEDULES:
            smoke = self.work / f"{path.lower()}_schedule.yaml"
            smoke.write_text(SMOKE_SCHEDULES[path])
            return smoke
        return REPO / path

    def ipq_updates(self, task: str) -> int:
        from quant_noise_plugin.schedule import load_schedule

        return load_schedule(self.schedule(task)).total_updates

    def budget(self, task: str, mode: str) -> int:
        """Training updates of a mode's own run (a finetuning run: the updates after its base)."""
        preset_updates = getattr(self.preset, f"{task}_updates")
        spec = modes_of(task)[mode].updates
        if spec == "preset":
            return preset_updates
        if spec == "preset+ipq":
            return preset_updates + self.ipq_updates(task)
        return max(1, round(preset_updates * float(spec.rstrip("%")) / 100))

    def total_budget(self, task: str, mode: str) -> int:
        """Training updates the model has seen before compression (its base's included)."""
        base = modes_of(task)[mode].base
        return self.budget(task, mode) + (self.total_budget(task, base) if base else 0)

    def mode_flags(self, task: str, mode: str) -> List[str]:
        """The fairseq-train flags of a row, "{N%}" placeholders resolved against the row's own budget."""
        updates = self.budget(task, mode)
        return [re.sub(r"\{(\d+)%\}", lambda m: str(round(updates * int(m.group(1)) / 100)), f) for f in modes_of(task)[mode].flags]

    def mode_identity(self, task: str, mode: str) -> list:
        """What makes a row's model: its flags, budget and base (recursively); part of every cache key."""
        spec = modes_of(task)[mode]
        identity = [self.mode_flags(task, mode)]
        if spec.base or spec.updates != "preset":
            identity += [self.budget(task, mode), self.mode_identity(task, spec.base) if spec.base else None]
        if spec.ipq_flags:
            identity.append(list(spec.ipq_flags))
        return identity

    def common(self, updates: int, save: Path) -> List:
        p = self.preset
        return ["--user-dir", PLUGIN, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "0.5",
                "--max-tokens", p.max_tokens, "--max-update", updates, "--save-dir", save, "--seed", p.seed,
                "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "100",
                "--validate-interval-updates", updates, *device_flags(), "--num-workers", "0", *p.extra]

    # -- training (cached: fairseq resumes from checkpoint_last.pt and stops at --max-update) --

    def arch(self, task: str) -> List:
        return getattr(self.preset, f"{task}_arch")

    def length_flags(self, task: str) -> List:
        """Sequence length flags shared by a task's training, iPQ and evaluation runs."""
        p = self.preset
        return {"lm": ["--tokens-per-sample", p.tokens_per_sample], "mt": [], "cls": ["--max-positions", p.cls_max_positions]}[task]

    def pretrained_encoder(self) -> Path:
        """The classifier rows' common start: the encoder pretrained as a masked LM on the LM data, without noise."""
        p = self.preset
        updates = p.cls_pretrain_updates
        save = self.work / f"cls-pretrain-{key(p.cls_arch, updates, p.seed, p.max_tokens, p.cls_max_positions)}"
        run_once(save, ["fairseq-train", self.data / "lm" / "bin", "--task", "masked_lm", "--criterion", "masked_lm", *p.cls_arch,
                        "--tokens-per-sample", p.cls_max_positions, "--lr", 0.0005, "--lr-scheduler", "inverse_sqrt",
                        "--warmup-updates", min(400, max(1, updates // 5)), *self.common(updates, save)], "train.log")
        return save / "checkpoint_last.pt"

    def train(self, task: str, mode: str) -> Path:
        p = self.preset
        arch = self.arch(task)
        spec = modes_of(task)[mode]
        updates = self.budget(task, mode)
        flags = self.mode_flags(task, mode)
        lr, warmup = PEAK_LR[task], min(400, max(1, updates // 5))
        finetune = []
        if spec.base:
            base = self.train(task, spec.base)
            finetune = ["--finetune-from-model", base]
            lr, warmup = lr * FINETUNE_LR_FACTOR, max(1, updates // 10)
            save = self.work / f"{task}-finetune-{key(arch, flags, updates, p.seed, p.max_tokens, str(base.parent.name))}"
        elif task == "cls":
            base = self.pretrained_encoder()
            finetune = ["--finetune-from-model", base]
            save = self.work / f"{task}-train-{key(arch, flags, updates, p.seed, p.max_tokens, str(base.parent.name))}"
        else:
            save = self.work / f"{task}-train-{key(arch, flags, updates, p.seed, p.max_tokens)}"
        task_flags = [*TASK_FLAGS[task][0], *self.length_flags(task), "--lr", lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", warmup]
        run_once(save, ["fairseq-train", self.data / task / "bin", *task_flags, *arch, *flags, *finetune, *self.common(updates, save)], "train.log")
        return save / "checkpoint_last.pt"

    def ipq(self, task: str, dense: Path, column: str, mode: str) -> Path:
        schedule = self.schedule(task, column)
        from quant_noise_plugin.schedule import load_schedule

        updates = load_schedule(schedule).total_updates
        arch = [*self.arch(task), *modes_of(task)[mode].ipq_flags]
        save = dense.parent.parent / f"{dense.parent.name}-ipq-{key(schedule.read_text(), arch)}"
        task_flags = [*TASK_FLAGS[task][1], *self.length_flags(task), "--lr", 0.0002 if task != "cls" else 0.0001]
        run_once(save, ["fairseq-train", self.data / task / "bin", *task_flags, "--ipq-config", schedule, "--finetune-from-model", dense,
                        *arch, *self.common(updates, save)], "ipq.log")
        return save / "checkpoint_last.pt"

    def pack_flags(self, task: str, kind: Optional[str]) -> List:
        """`quant-noise pack` flags of a column's packing: "int8", "int4", "w8a8" (calibrated on the training data)."""
        return {None: [], "int8": ["--scalar-bits", 8], "int4": ["--scalar-bits", 4],
                "w8a8": ["--scalar-bits", 8, "--activation-bits", 8, "--calibrate", self.data / task / "bin", *CALIBRATION]}[kind]

    def compressed(self, task: str, mode: str, column: str) -> Path:
        dense = self.train(task, mode)
        method, suffix = split_column(column)
        if method in DENSE_COLUMNS:
            base, kind = dense, (None if method == "fp32" else method)
        else:
            base, kind = self.ipq(task, dense, method, mode), suffix
        out = base.parent.parent / f"{base.parent.name}-{column.replace('+', '_')}.pt"  # an iPQ file is named by its run
        if not out.exists():
            if column == "fp32":  # dense, inference-only fp32 (what stock fairseq loads)
                sh(["quant-noise", "unpack", base, out])
            else:
                sh(["quant-noise", "pack", base, out, *self.pack_flags(task, kind)])
        return out

    # -- cells (cached by their configuration) --

    def cell(self, task: str, mode: str, column: str, compute: bool = True) -> Optional[dict]:
        """The cell's cached result, else (when ``compute``) train/compress/evaluate what it needs."""
        p = self.preset
        preset = {k: v for k, v in asdict(p).items() if task == "cls" or not k.startswith("cls_")}  # a task's cells, by what it uses
        parts = [preset, self.mode_identity(task, mode)]
        method, suffix = split_column(column)
        if method in SCHEDULE_COLUMNS:  # an edited or overridden schedule is another cell
            parts.append(hashlib.sha256(self.schedule(task, method).read_bytes()).hexdigest())
        if "w8a8" in (method, suffix):
            parts.append(CALIBRATION)
        cache = self.work / "cells" / f"{task}-{mode}-{column}-{key(*parts)}.json"
        if cache.exists():
            print(f"[cached] {task} {mode} {column} seed {p.seed}")
            return json.loads(cache.read_text())
        if not compute:
            print(f"[missing] {task} {mode} {column} seed {p.seed}")
            return None
        path = self.compressed(task, mode, column)
        result = {"task": task, "mode": mode, "column": column, "seed": p.seed, "bytes": path.stat().st_size,
                  "checkpoint": str(path.relative_to(self.work)), "train_updates": self.total_budget(task, mode),
                  "device": self.device_name(), "command": self.command}
        if method in SCHEDULE_COLUMNS:
            result["ipq_updates"] = self.ipq_updates(task) if method == "ipq" else _schedule_updates(self.schedule(task, method))
        evaluate = {"lm": self.eval_lm, "mt": self.bleu, "cls": self.accuracy}[task]
        for subset in ("test", "valid"):
            result[metric_of(task, subset)] = evaluate(path, subset)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result))
        return result

    def eval_lm(self, path: Path, subset: str) -> float:
        p = self.preset
        out = sh(["fairseq-eval-lm", self.data / "lm/bin", "--user-dir", PLUGIN, "--path", path, "--gen-subset", subset, *device_flags(),
                  "--tokens-per-sample", p.tokens_per_sample, "--max-tokens", 4096, "--context-window", p.tokens_per_sample // 2])
        return float(out.rsplit("Perplexity:", 1)[1].split()[0])

    def accuracy(self, path: Path, subset: str) -> float:
        """fairseq-validate's accuracy (the sentence_prediction criterion logs it) on the compressed checkpoint."""
        out = sh(["fairseq-validate", self.data / "cls" / "bin", "--user-dir", PLUGIN, "--path", path, "--valid-subset", subset,
                  *TASK_FLAGS["cls"][0], *self.length_flags("cls"), "--max-tokens", 8192, *device_flags()])
        line = [line for line in out.splitlines() if f"valid on '{subset}' subset" in line][-1]
        return float(line.split("| accuracy ")[1].split(" |")[0])

    def bleu(self, path: Path, subset: str) -> float:
        import sacrebleu

        mt = self.data / "mt"
        out = sh(["fairseq-generate", mt / "bin", "--user-dir", PLUGIN, "--path", path, "--gen-subset", subset, *device_flags(),
                  "--beam", 4, "--max-tokens", 4000, "--bpe", "sentencepiece", "--sentencepiece-model", mt / "spm.bpe.model"])
        hyps = {}
        for line in out.splitlines():
            if line.startswith("D-"):
                idx, _, text = line[2:].split("\t", 2)
                hyps[int(idx)] = text
        refs = (mt / "raw" / f"{subset}.es").read_text(encoding="utf-8").splitlines()
        ordered = [hyps.get(i, "") for i in range(len(refs))]
        return sacrebleu.corpus_bleu(ordered, [refs]).score


def _schedule_updates(path: Path) -> int:
    from quant_noise_plugin.schedule import load_schedule

    return load_schedule(path).total_updates


# -- rendering --------------------------------------------------------------------------------


METRICS = {"lm": "ppl", "mt": "bleu", "cls": "acc"}
TITLES = {"lm": "Perplexity on the KJV test split (lower is better)",
          "mt": "BLEU (sacrebleu, detokenized) on the KJV->RV1909 test split",
          "cls": "Accuracy (%) on the KJV verse-pair test split (next verse / same chapter / another book)"}
TABLE_FILES = {"lm": "lm_kjv.md", "mt": "mt_en_es.md", "cls": "cls_kjv_pairs.md"}


def metric_of(task: str, subset: str = "test") -> str:
    return METRICS[task] if subset == "test" else f"valid_{METRICS[task]}"


def seeds_text(values: List[float]) -> str:
    """One seed: its value; several: their mean and each value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({' / '.join(f'{v:.2f}' for v in values)})"


def group(results: List[dict], task: str) -> Dict[Tuple[str, str], List[dict]]:
    """Cells of one task by (mode, column), seeds in increasing order."""
    cells: Dict[Tuple[str, str], List[dict]] = {}
    for r in sorted((r for r in results if r["task"] == task), key=lambda r: r.get("seed", 1)):
        cells.setdefault((r["mode"], r["column"]), []).append(r)
    return cells


def render(results: List[dict], task: str, modes: List[str], columns: List[str], runner: Runner, seeds: List[int]) -> str:
    metric = metric_of(task)
    cells = group(results, task)
    fp32 = {m: cells[(m, "fp32")][0]["bytes"] for m in modes if (m, "fp32") in cells}
    head = "| training \\ compression | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for m in modes:
        row = [f"| {m} |"]
        for c in columns:
            rs = cells.get((m, c))
            if not rs:
                row.append(" – |")
                continue
            ratio = f", x{fp32[m] / rs[0]['bytes']:.0f}" if m in fp32 else ""
            row.append(f" {seeds_text([r[metric] for r in rs])} ({rs[0]['bytes'] / 1e6:.2f} MB{ratio}) |")
        lines.append("".join(row))
    p = runner.preset
    title = TITLES[task]
    schedules = ", ".join(f"{c} = `{shown(runner.schedule(task, c))}`" for c in SCHEDULE_COLUMNS if any(split_column(x)[0] == c for x in columns))
    baselines = cls_baselines(runner) if task == "cls" else ""
    return (
        f"# {title}\n\n{baselines}Each cell: {metric} (size on disk of the compressed checkpoint, compression ratio vs the fp32 one)"
        f"{'; with several seeds, their mean (then each seed)' if len(seeds) > 1 else ''}. "
        f"Every number is a real `fairseq-eval-lm`/`fairseq-generate`/`fairseq-validate` run on that checkpoint.\n\n" + "\n".join(lines) +
        f"\n\nTraining modes:\n{legend(runner, task, modes)}\n\nColumns: fp32 = dense inference checkpoint (`quant-noise unpack`); int8/int4 = every "
        f"Linear/Embedding weight as int codes with per-row scales, rest fp16 (`quant-noise pack --scalar-bits`); w8a8 = int8 "
        f"weights (symmetric) and int8 inputs of every Linear, calibrated on training batches (`--scalar-bits 8 --activation-bits 8 "
        f"--calibrate DATA {' '.join(CALIBRATION)}`), computed on int8 kernels; iPQ columns = "
        f"`--task ipq_*` with the schedule ({schedules}), packed; +int8 = the same, centroids and remaining layers int8; "
        f"+w8a8 = the same with int8 activations.\n\n"
        f"Preset `{runner.args.preset}`: arch `{' '.join(getattr(p, task + '_arch'))}`, {getattr(p, task + '_updates')} training updates"
        f"{f' (after {p.cls_pretrain_updates} masked-LM pretraining updates on the KJV LM data, without noise, shared by the rows)' if task == 'cls' else ''}, "
        f"--max-tokens {p.max_tokens}, seeds {', '.join(map(str, seeds))}.\n\nCells computed by:\n{provenance(c for rs in cells.values() for c in rs)}\n\n"
        f"Command: `{runner.command}`\n"
    )


def legend(runner: Runner, task: str, modes: List[str]) -> str:
    lines = []
    for m in modes:
        spec = modes_of(task)[m]
        budget = f"{runner.total_budget(task, m)} training updates" + (f" ({spec.base} + {runner.budget(task, m)} finetuning)" if spec.base else "")
        ipq = f"; iPQ runs add `{' '.join(spec.ipq_flags)}`" if spec.ipq_flags else ""
        lines.append(f"- `{m}`: {spec.doc}: `{' '.join(runner.mode_flags(task, m)) or '(no flags)'}`; {budget}{ipq}")
    return "\n".join(lines)


def render_ablation(results: List[dict], task: str, modes: List[str], columns: List[str], runner: Runner, seeds: List[int]) -> str:
    """Every lever: valid (to choose) and test (to report) for each seed, and iPQ's cost against the dense control."""
    cells = group(results, task)
    better = "lower" if task == "lm" else "higher"  # perplexity; BLEU and accuracy
    control = "none_long" if "none_long" in modes else None
    ipq_updates = runner.ipq_updates(task)  # the schedule's, read once
    out = []
    for subset in ("valid", "test"):
        metric = metric_of(task, subset)
        head = "| mode | updates (train + iPQ) | seeds | " + " | ".join(columns) + (" | " + " | ".join(f"{c} vs dense control" for c in columns if c != "fp32") if control else "") + " |"
        lines = [head, "|---|---:|---:|" + "---:|" * (len(columns) + (len([c for c in columns if c != 'fp32']) if control else 0))]
        ref = [r[metric] for r in cells.get((control, "fp32"), [])] if control else []
        for m in modes:
            ran = sorted({r["seed"] for c in columns for r in cells.get((m, c), [])})
            row = [f"| {m} | {runner.total_budget(task, m)}{f' + {ipq_updates}' if any(split_column(c)[0] in SCHEDULE_COLUMNS for c in columns) else ''} | "
                   f"{', '.join(map(str, ran)) or '–'} |"]
            equal_budget = control and runner.total_budget(task, m) + ipq_updates == runner.total_budget(task, control)
            for c in columns:
                rs = cells.get((m, c))
                row.append(f" {seeds_text([r[metric] for r in rs])} |" if rs else " – |")
            if control:
                for c in columns:
                    if c == "fp32":
                        continue
                    rs = cells.get((m, c))
                    if not rs or not ref or not equal_budget:
                        row.append(" – |")
                        continue
                    mean, base = statistics.mean(r[metric] for r in rs), statistics.mean(ref)
                    row.append(f" {100 * (mean / base - 1):+.1f}% |" if task == "lm" else f" {mean - base:+.2f} |")
            lines.append("".join(row))
        out.append(f"### {'Valid' if subset == 'valid' else 'Test'} split ({metric}, {better} is better)\n\n" + "\n".join(lines))
    p = runner.preset
    return (
        f"## {'Language model (KJV)' if task == 'lm' else 'Translation (KJV -> RV1909)'}, preset `{runner.args.preset}`, seeds {', '.join(map(str, seeds))}\n\n"
        f"Each cell: the mean over seeds (then each seed). Choose on valid, report test. "
        f"`vs dense control`: the mean against `{control}`'s fp32 model, trained without noise for as many updates as training + iPQ "
        f"(shown for the rows of that total budget only; rows trained longer compare with `{control}`'s own iPQ columns).\n\n"
        + "\n\n".join(out) +
        f"\n\nModes:\n{legend(runner, task, modes)}\n\nColumns: fp32 = the dense model; "
        + ", ".join(f"{c} = `{shown(runner.schedule(task, c))}`" for c in SCHEDULE_COLUMNS if c in columns) +
        f" (packed, bytes on disk as in the main tables).\n\nArch `{' '.join(getattr(p, task + '_arch'))}`, --max-tokens {p.max_tokens}.\n\n"
        f"Cells computed by:\n{provenance(c for rs in cells.values() for c in rs)}\n\nCommand: `{runner.command}`\n"
    )


def cls_baselines(runner: Runner) -> str:
    """What the classifier's accuracy means: the majority class, and a bag-of-words logistic regression
    (binary word features of each verse and of their overlap), on the same splits. Cached under --work."""
    cache = runner.work / "cells" / f"cls-baselines-{key(sorted(p.name for p in (runner.data / 'cls' / 'raw').glob('*')))}.json"
    if not cache.exists():
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
        from scipy.sparse import hstack

        raw = runner.data / "cls" / "raw"
        read = {split: [(raw / f"{split}.{side}").read_text(encoding="utf-8").splitlines() for side in ("input0", "input1", "label")]
                for split in ("train", "valid", "test")}
        vectorizer = CountVectorizer(binary=True, token_pattern=r"\S+", lowercase=True).fit(read["train"][0] + read["train"][1])

        def features(split):
            a, b = vectorizer.transform(read[split][0]), vectorizer.transform(read[split][1])
            return hstack([a, b, a.multiply(b)]).tocsr()

        model = LogisticRegression(max_iter=2000, C=1.0).fit(features("train"), read["train"][2])
        result = {}
        for split in ("valid", "test"):
            labels = read[split][2]
            majority = max(set(read["train"][2]), key=read["train"][2].count)
            result[split] = {"majority": 100 * labels.count(majority) / len(labels), "bow": 100 * model.score(features(split), labels)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result))
    result = json.loads(cache.read_text())
    return (f"Baselines on the same test split: majority class {result['test']['majority']:.1f}%, bag-of-words logistic regression "
            f"{result['test']['bow']:.1f}% (valid: {result['valid']['majority']:.1f}%, {result['valid']['bow']:.1f}%; binary word "
            f"features of each verse and of their overlap, trained on the training pairs).\n\n")


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

    tasks = [t for t in ("lm", "mt", "cls") if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = metric_of(task)
        cells = group(results, task)
        for mode in sorted({m for m, _ in cells}):
            pts = sorted((rs[0]["bytes"] / 1e6, statistics.mean(r[metric] for r in rs)) for (m, _), rs in cells.items() if m == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: they overlap otherwise
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel({"lm": "test perplexity", "mt": "BLEU", "cls": "test accuracy (%)"}[task])
        ax.set_title({"lm": "KJV language model", "mt": "KJV -> RV1909 translation", "cls": "KJV verse-pair classifier"}[task])
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
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: the preset's, 1); tables show each and their mean")
    parser.add_argument("--table", choices=("grid", "ablation"), default="grid",
                        help="grid: lm_kjv.md / mt_en_es.md; ablation: ablation_noise.md (valid and test, vs the dense control)")
    parser.add_argument("--lm-modes", nargs="*")
    parser.add_argument("--lm-columns", nargs="*")
    parser.add_argument("--mt-modes", nargs="*")
    parser.add_argument("--mt-columns", nargs="*")
    parser.add_argument("--cls-modes", nargs="*")
    parser.add_argument("--cls-columns", nargs="*")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=os.environ.get("QN_DEVICE", "cpu"), help="where fairseq runs")
    parser.add_argument("--lm-schedule", help="iPQ schedule YAML of the LM's ipq column (default: the preset's)")
    parser.add_argument("--mt-schedule", help="iPQ schedule YAML of the MT's ipq column (default: the preset's)")
    parser.add_argument("--cls-schedule", help="iPQ schedule YAML of the classifier's ipq column (default: the preset's)")
    parser.add_argument("--render-only", action="store_true",
                        help="compute nothing: tables and plot from the cells cached under --work (e.g. cells copied from another machine)")
    args = parser.parse_args(argv)
    ablation = args.table == "ablation"
    defaults = {  # what each table shows unless told otherwise
        "lm_modes": ["none", "qat_int4", "qn_pq_0.05", "qn_pq_0.1", "qn_pq_0.2", "qn_scalar_0.5_int4"] if not ablation else list(LM_MODES),
        "lm_columns": COLUMNS if not ablation else ["fp32", *SCHEDULE_COLUMNS],
        "mt_modes": ["none", "qn_pq_0.1"] if not ablation else list(MT_MODES),
        "mt_columns": MT_COLUMNS if not ablation else ["fp32", "ipq"],
        "cls_modes": list(CLS_MODES) if not ablation else [],
        "cls_columns": CLS_COLUMNS,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    os.environ["QN_DEVICE"] = args.device
    from quant_noise_plugin.schedule import ScheduleError, load_schedule

    for flag in ("lm_schedule", "mt_schedule", "cls_schedule"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')}: no such file {path}")
        try:
            if path:
                load_schedule(path)  # a bad schedule fails here, in one line, not hours into the grid
        except ScheduleError as error:
            parser.error(f"--{flag.replace('_', '-')}: {error}")
    for task in ("lm", "mt", "cls"):
        for m in getattr(args, f"{task}_modes"):
            if m not in modes_of(task):
                parser.error(f"--{task}-modes: unknown mode {m!r} (known: {', '.join(modes_of(task))})")
        for c in getattr(args, f"{task}_columns"):
            if not valid_column(task, c):
                parser.error(f"--{task}-columns: unknown column {c!r}")
    if not args.render_only and not (Path(args.data) / ".complete.json").exists():
        sh(["quant-noise", "data", "--output", args.data])
    seeds = args.seeds or [PRESETS[args.preset].seed]
    runners = {seed: Runner(args, seed) for seed in seeds}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(task, m, c) for task in ("lm", "mt", "cls") for m in getattr(args, f"{task}_modes") for c in getattr(args, f"{task}_columns")]
    results = []
    for seed in seeds:  # every cell of the first seed, then of the next: partial tables are complete rows early
        for task, mode, column in grid:
            result = runners[seed].cell(task, mode, column, compute=not args.render_only)
            if result is not None:
                results.append(result)
                write_outputs(results, args, runners[seeds[0]], out, seeds)
    names = ("ablation_noise.md",) if ablation else tuple(TABLE_FILES.values())
    for name in names:
        if (out / name).exists():
            print((out / name).read_text())


def write_outputs(results: List[dict], args, runner: Runner, out: Path, seeds: List[int]) -> None:
    if args.table == "ablation":
        parts = [render_ablation(results, task, getattr(args, f"{task}_modes"), getattr(args, f"{task}_columns"), runner, seeds)
                 for task in ("lm", "mt", "cls") if any(r["task"] == task for r in results)]
        reading = "What the rows say, failures included: README.md, section \"Where and when to put the noise\".\n\n"
        (out / "ablation_noise.md").write_text("# Where and when to put Quant-Noise: the ablation\n\n" + reading + "\n\n".join(parts))
        (out / "ablation_noise.json").write_text(json.dumps(results, indent=1))
        return
    for task in ("lm", "mt", "cls"):
        if any(r["task"] == task for r in results):
            table = render(results, task, getattr(args, f"{task}_modes"), getattr(args, f"{task}_columns"), runner, seeds)
            (out / TABLE_FILES[task]).write_text(table)
    (out / "reproduce.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "size_vs_quality.png")


if __name__ == "__main__":
    main()
