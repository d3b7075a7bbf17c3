"""The runs behind a cell: train, iPQ, pack (calibrate), each one real fairseq / quant-noise CLI call.

``Runner`` builds every command from the grid (one preset, one seed) and runs what is not finished
yet; the demo and the reproduction both go through it, so their flags cannot drift apart. Command
building is pure (``train_command``, ``ipq_command``, ``compressed_path``): the cache keys and
``--render-only`` use it without running anything.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .cache import finished, key, mark_finished
from .grid import PLAN_PREFIX, REPO, Grid, Preset, resolve_flags, updates_for
from .shell import PLUGIN, sh

FINETUNE_LR_FACTOR = 0.5  # finetuning rows (and their controls) run at half the task's peak learning rate
PRETRAIN_LR = 0.0005  # the classifier's masked-LM pretraining


def warmup(updates: int) -> int:
    return min(400, max(1, updates // 5))


@lru_cache(maxsize=None)
def schedule_updates(path: Path) -> int:
    from quant_noise_plugin.schedule import load_schedule

    return load_schedule(path).total_updates


class Runner:
    """One preset and seed of the grid, its runs under ``work``, fairseq on ``device`` ("cpu" or "cuda")."""

    def __init__(self, grid: Grid, preset: str, seed: Optional[int], work: Path, data: Path, device: str = "cpu",
                 schedules: Optional[Dict[str, str]] = None, dry_run: bool = False):
        self.grid, self.preset_name, self.dry_run = grid, preset, dry_run
        self.printed: set = set()  # dry run: each command once
        self.preset: Preset = grid.presets[preset] if seed is None else replace(grid.presets[preset], seed=seed)
        self.work, self.data, self.device = Path(work).resolve(), Path(data).resolve(), device
        self.overrides = {task: Path(path).resolve() for task, path in (schedules or {}).items() if path}  # --lm-schedule etc.

    # -- what the grid says ----------------------------------------------------------------------

    def schedule(self, task: str, column: str = "ipq", mode: Optional[str] = None) -> Path:
        """The iPQ schedule of a schedule column: --lm-schedule/--mt-schedule/--cls-schedule for "ipq", else the preset's;
        a planned column's (``plan_<twin>``): the YAML `quant-noise plan` wrote for the row's model (``plan_command``)."""
        if column in getattr(self.preset, task).targets:  # planned by the iPQ run itself, beside its checkpoints
            from quant_noise_plugin.tasks.ipq import PLAN_FILE

            return self.ipq_command(task, mode, column)[1] / PLAN_FILE
        if column.startswith(PLAN_PREFIX):
            return self.plan_command(task, mode, column)[1]
        if column == "ipq" and task in self.overrides:
            return self.overrides[task]
        return REPO / getattr(self.preset, task).schedules[column]

    def ipq_updates(self, task: str, column: str = "ipq") -> int:
        """A schedule column's updates (a planned column: its twin's, which the plan splits over its own stages; a target
        column: the preset's target_updates)."""
        if column in getattr(self.preset, task).targets:
            return getattr(self.preset, task).target_updates
        return schedule_updates(self.schedule(task, column.removeprefix(PLAN_PREFIX)))

    def plan_command(self, task: str, mode: str, column: str) -> Tuple[List, Path]:
        """`quant-noise plan` of a row's model for a planned column: the twin column's file bytes as the target, the twin
        schedule's objective, final scalar bits and updates, the twin schedule as the candidate the plan is measured
        against (so a planned point keeps the twin's schedule where that measures better), and a menu reaching the twin's largest K (the planner's
        default stops at 256; the x20 schedule's embedding has 1024). The target is known once the twin is packed
        (before: TWIN_BYTES)."""
        from quant_noise_plugin.budget import CENTROID_COUNTS
        from quant_noise_plugin.schedule import load_schedule

        twin = column[len(PLAN_PREFIX):]
        twin_schedule = load_schedule(self.schedule(task, twin))
        twin_file = self.compressed_path(task, mode, twin)[1]
        target = twin_file.stat().st_size if twin_file.exists() else "TWIN_BYTES"
        trained = self.trained(task, mode)
        out = self.work / "plans" / f"{trained.parent.name}-{column}.yaml"
        cmd = ["quant-noise", "plan", trained, "--target-size", target, "--calibrate", self.data / task / "bin",
               "--data", self.data / task / "bin", "--objective", twin_schedule.objective,
               "--scalar-bits", twin_schedule.final_scalar_bits or 0, "--updates", twin_schedule.total_updates,
               "--candidates", self.schedule(task, twin),  # the plan measured against its twin, the better one kept
               "--anchors", 2, "-o", out]  # (the default since plans with one anchor lost on noise rows: named, so they replan)
        if twin_schedule.largest_centroids > max(CENTROID_COUNTS):
            counts = list(CENTROID_COUNTS)
            while counts[-1] < twin_schedule.largest_centroids:
                counts.append(2 * counts[-1])
            cmd[-2:-2] = ["--centroids", *counts]
        return cmd, out

    def budget(self, task: str, mode: str) -> int:
        """Training updates of a row's own run (a finetuning row: the updates after its base)."""
        return updates_for(self.grid, self.preset, task, mode, lambda: self.ipq_updates(task))

    def total_budget(self, task: str, mode: str) -> int:
        """Training updates the model has seen before compression (its base's included)."""
        base = self.grid.mode(task, mode).base
        return self.budget(task, mode) + (self.total_budget(task, base) if base else 0)

    def mode_flags(self, task: str, mode: str) -> List[str]:
        return resolve_flags(self.grid.mode(task, mode).flags, self.budget(task, mode))

    # -- commands (pure) -------------------------------------------------------------------------

    def device_flags(self) -> List[str]:
        return ["--cpu"] if self.device == "cpu" else []

    def normalized(self, cmd: List) -> List[str]:
        """A command as a cache key sees it: data, work, plugin and repository folders as placeholders (a moved
        clone keeps its cache), the device left out."""
        swap = {str(self.data): "DATA", str(self.work): "WORK", PLUGIN: "PLUGIN", str(REPO): "REPO"}  # most specific first
        out = [str(c) for c in cmd if c not in self.device_flags()]
        for old, new in swap.items():
            out = [c.replace(old, new) for c in out]
        return out

    def run_dir(self, name: str, cmd: List, *extra) -> Path:
        """A run's folder: named by its command and ``extra`` (e.g. the schedule's contents)."""
        return self.work / f"{name}-{key(self.normalized(cmd), *extra)}"

    def common(self, updates: int, every_epoch: bool = False) -> List:
        """Flags of every run; ``every_epoch``: validate each epoch (keep_best training), else once at the end."""
        p = self.preset
        validate = [] if every_epoch else ["--validate-interval-updates", updates]
        return ["--user-dir", PLUGIN, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "0.5",
                "--max-tokens", p.max_tokens, "--max-update", updates, "--seed", p.seed,
                "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "100",
                *validate, *self.device_flags(), "--num-workers", "0", *p.extra]

    def lr_flags(self, task: str, lr: float, warm: int, updates: int, stop_early: bool = True) -> List:
        """The task preset's learning-rate schedule over a run of ``updates`` (``stop_early``: with its patience)."""
        spec = getattr(self.preset, task)
        flags = ["--lr", lr, "--lr-scheduler", spec.lr_scheduler, "--warmup-updates", warm]
        if spec.lr_scheduler == "polynomial_decay":
            flags += ["--total-num-update", updates, "--end-learning-rate", 0.0]
        if spec.patience and stop_early:  # the grid allows it only with keep_best
            flags += ["--patience", spec.patience]
        return flags

    def trained(self, task: str, mode: str) -> Path:
        """The checkpoint of a row's training that the columns compress: its best on valid (keep_best) or its last."""
        name = "checkpoint_best.pt" if getattr(self.preset, task).keep_best else "checkpoint_last.pt"
        return self.train_command(task, mode)[1] / name

    def length_flags(self, task: str) -> List:
        """Sequence length flags shared by a task's training, iPQ and evaluation runs."""
        return {"lm": ["--tokens-per-sample", self.preset.tokens_per_sample], "mt": [],
                "cls": ["--max-positions", self.preset.cls.max_positions]}[task]

    def pretrain_command(self) -> Tuple[List, Path]:
        """The classifier rows' common start: the encoder pretrained as a masked LM on the LM data, without noise."""
        cls = self.preset.cls
        cmd = ["fairseq-train", self.data / "lm" / "bin", "--task", "masked_lm", "--criterion", "masked_lm", *cls.arch,
               "--tokens-per-sample", cls.max_positions,
               *self.lr_flags("cls", cls.pretrain_lr or PRETRAIN_LR, warmup(cls.pretrain_updates), cls.pretrain_updates, stop_early=False),
               *self.common(cls.pretrain_updates)]
        return self._with_save(cmd, "cls-pretrain")

    def train_command(self, task: str, mode: str) -> Tuple[List, Path]:
        """fairseq-train of a row: its flags, budget and learning rate; a finetuning row starts from its base."""
        spec, spec_task = self.grid.mode(task, mode), self.grid.tasks[task]
        updates = self.budget(task, mode)
        lr, warm, start = getattr(self.preset, task).lr or spec_task.lr, warmup(updates), []
        if spec.base:
            start = ["--finetune-from-model", self.trained(task, spec.base)]
            lr, warm = lr * FINETUNE_LR_FACTOR, max(1, updates // 10)
        elif task == "cls":
            start = ["--finetune-from-model", self.pretrain_command()[1] / "checkpoint_last.pt"]
        keep_best = getattr(self.preset, task).keep_best
        cmd = ["fairseq-train", self.data / task / "bin", *spec_task.train, *(spec_task.best if keep_best else []),
               *self.length_flags(task), *self.lr_flags(task, lr, warm, updates), *getattr(self.preset, task).arch,
               *self.mode_flags(task, mode), *start, *self.common(updates, keep_best)]
        return self._with_save(cmd, f"{task}-{'finetune' if spec.base else 'train'}")

    def ipq_command(self, task: str, mode: str, column: str = "ipq") -> Tuple[List, Path]:
        """fairseq-train --task ipq_*: the row's trained model through a schedule (plus the row's iPQ-time flags)."""
        dense = self.trained(task, mode)
        target = getattr(self.preset, task).targets.get(column)
        if target is not None:  # the iPQ task plans for the target at its start (--ipq-target-size)
            from quant_noise_plugin.budget import PLANNER_VERSION

            how, digest = ["--ipq-target-size", target], f"target, planner {PLANNER_VERSION}"
        else:
            schedule = self.schedule(task, column, mode)
            how = ["--ipq-config", schedule]
            current = schedule.exists() and (not column.startswith(PLAN_PREFIX) or self.plan_is_current(task, mode, column))
            digest = hashlib.sha256(schedule.read_bytes()).hexdigest() if current else "not planned yet"  # (a stale plan: replanned first)
        cmd = ["fairseq-train", self.data / task / "bin", *self.grid.tasks[task].ipq, *self.length_flags(task),
               "--lr", self.grid.tasks[task].ipq_lr, *how, "--finetune-from-model", dense,
               *getattr(self.preset, task).arch, *self.grid.mode(task, mode).ipq_flags, *self.common(self.ipq_updates(task, column))]
        return self._with_save(cmd, f"{dense.parent.name}-ipq", digest)

    def _with_save(self, cmd: List, name: str, *extra) -> Tuple[List, Path]:
        save = self.run_dir(name, cmd, *extra)
        return [*cmd, "--save-dir", save], save

    def pack_flags(self, task: str, packing: Optional[str]) -> List:
        if packing is None:
            return []
        spec = self.grid.packings[packing]
        return [*spec.flags, *(["--calibrate", self.data / task / "bin"] if spec.calibrate else [])]

    def compressed_path(self, task: str, mode: str, column: str) -> Tuple[Path, Path, List]:
        """(the checkpoint a column compresses, the compressed file, its `quant-noise pack` flags)."""
        method, _, suffix = column.partition("+")
        if method == "fp32" or method in self.grid.packings:
            source, packing = self.trained(task, mode), (None if method == "fp32" else method)
        else:
            source, packing = self.ipq_command(task, mode, method)[1] / "checkpoint_last.pt", suffix or None
        flags = self.pack_flags(task, packing)
        # named by the run and the column only: torch stores the file's name in each zip record, so a longer
        # name is a bigger file; packing flags are in the cell's key, and the file is rewritten for each cell
        return source, source.parent.parent / f"{source.parent.name}-{column.replace('+', '_')}.pt", flags

    # -- running ---------------------------------------------------------------------------------

    def run(self, cmd: List, save: Path, log_name: str) -> Path:
        """Run a fairseq-train command unless it already finished in ``save``; its last checkpoint."""
        if finished(save):
            print(f"[done] {save}", flush=True)
        elif self.dry_run:
            self.show(cmd)
        else:
            sh(cmd, save / log_name)
            mark_finished(save)
        return save / "checkpoint_last.pt"

    def show(self, cmd: List) -> None:
        line = " ".join(map(str, cmd))
        if line not in self.printed:
            self.printed.add(line)
            print(f"$ {line}", flush=True)

    def train(self, task: str, mode: str) -> Path:
        base = self.grid.mode(task, mode).base
        if base:
            self.train(task, base)
        elif task == "cls":
            self.run(*self.pretrain_command(), "train.log")
        return self.run(*self.train_command(task, mode), "train.log")

    def ipq(self, task: str, mode: str, column: str = "ipq") -> Path:
        self.train(task, mode)
        if column.startswith(PLAN_PREFIX):
            self.plan(task, mode, column)
        return self.run(*self.ipq_command(task, mode, column), "ipq.log")

    def plan_is_current(self, task: str, mode: str, column: str) -> bool:
        """Whether a planned column's YAML was written by today's plan command (its .command record says which)."""
        return self._planned_by(*self.plan_command(task, mode, column))

    def _planned_by(self, cmd: List, out: Path) -> bool:
        record = out.with_suffix(".command")
        return out.exists() and record.exists() and record.read_text() == " ".join(self.normalized(cmd))

    def plan(self, task: str, mode: str, column: str) -> Path:
        """A planned column's schedule, planned once for the twin's bytes (replanned when the plan command changes)."""
        self.compressed(task, mode, column[len(PLAN_PREFIX):])
        cmd, out = self.plan_command(task, mode, column)
        if self._planned_by(cmd, out):
            print(f"[done] {out}", flush=True)
        elif self.dry_run:
            self.show(cmd)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            sh(cmd, out.with_suffix(".log"))
            out.with_suffix(".command").write_text(" ".join(self.normalized(cmd)))
        return out

    def compressed(self, task: str, mode: str, column: str) -> Path:
        """The column's file: the dense model unpacked to fp32 (what stock fairseq loads), or packed."""
        method = column.partition("+")[0]
        if method == "fp32" or method in self.grid.packings:
            self.train(task, mode)
        else:
            self.ipq(task, mode, method)
        source, out, flags = self.compressed_path(task, mode, column)  # after the runs: a planned column's is named by its plan
        cmd = ["quant-noise", "unpack", source, out] if column == "fp32" else ["quant-noise", "pack", source, out, *flags]
        if self.dry_run:
            self.show(cmd)
        else:
            sh(cmd)  # never a stale file: packing is seconds, and a column's flags may have changed in columns.yaml
        return out
