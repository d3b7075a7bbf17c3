"""The experiment grid as data: presets, rows and columns read from configs/experiments/*.yaml.

Each file is merged into a structured config, so a typo or a wrong type fails at start in one line
naming the file and key (as iPQ schedules do), not hours into a run. Everything else here is pure:
a row's budget and flags under a preset, which columns exist. Nothing runs fairseq.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "experiments"
TASKS = ("lm", "mt", "cls")
DEFAULT_PRESET = "full"  # reproduce.py's --preset, and the preset of stored records that name none
LR_SCHEDULERS = ("inverse_sqrt", "polynomial_decay")


class GridError(ValueError):
    """A grid YAML or a selection that cannot run; the message names the file, key, row or column."""


@dataclass
class Mode:
    """A row: how the model is trained before it is compressed (see the comment atop lm.yaml)."""

    doc: str = MISSING
    flags: List[str] = field(default_factory=list)
    updates: str = "preset"  # "preset", "preset+ipq" (the equal-budget dense control) or "N%"
    base: Optional[str] = None  # finetune this row's trained model
    ipq_flags: List[str] = field(default_factory=list)


@dataclass
class Table:
    modes: Optional[List[str]] = None  # None: every row of the task
    columns: List[str] = MISSING


@dataclass
class Task:
    train: List[str] = MISSING  # fairseq-train flags of a training run (task, criterion)
    ipq: List[str] = MISSING  # and of an iPQ run
    lr: float = MISSING
    ipq_lr: float = MISSING
    # Added to a training run when its preset keeps the best checkpoint: the valid metric that picks
    # checkpoint_best.pt and counts patience (fairseq's default is the loss; the classifier is judged on accuracy).
    best: List[str] = field(default_factory=list)
    tables: Dict[str, Table] = field(default_factory=dict)  # "grid", "ablation": the default selections
    modes: Dict[str, Mode] = field(default_factory=dict)


@dataclass
class TaskPreset:
    arch: List[str] = MISSING
    updates: int = MISSING
    schedules: Dict[str, str] = field(default_factory=dict)  # column name -> iPQ schedule YAML (repository-relative)
    # column name -> a size target (`--ipq-target-size`: the iPQ task plans its own schedule), run for target_updates
    targets: Dict[str, str] = field(default_factory=dict)
    target_updates: int = 500
    pretrain_updates: int = 0  # cls: masked-LM pretraining of the encoder on the LM data
    pretrain_lr: Optional[float] = None  # cls: its peak learning rate (default: runs.PRETRAIN_LR)
    max_positions: int = 128  # cls: sequence length
    # How a training run spends its updates. "inverse_sqrt": the short presets (the model is still learning
    # when it stops); "polynomial_decay": the learning rate falls linearly to zero at the last update, so the
    # run ends annealed. With keep_best, each run validates every epoch, stops after `patience` epochs
    # without a better valid loss (0: never), and its checkpoint_best.pt (chosen on valid) is what the
    # columns compress and what finetuning rows start from.
    lr_scheduler: str = "inverse_sqrt"
    keep_best: bool = False
    patience: int = 0
    lr: Optional[float] = None  # peak learning rate of the training runs (default: the task's, in its YAML)
    doc: str = ""  # this task's panel heading in the results (default: the preset's doc)


@dataclass
class Preset:
    doc: str = MISSING
    lm: TaskPreset = MISSING
    mt: TaskPreset = MISSING
    cls: TaskPreset = MISSING
    max_tokens: int = 2048
    tokens_per_sample: int = 128
    seed: int = 1
    extra: List[str] = field(default_factory=list)  # added to every training and iPQ run


@dataclass
class Packing:
    flags: List[str] = MISSING  # `quant-noise pack` flags
    calibrate: bool = False  # add --calibrate <the task's data>
    after_ipq: bool = True  # also a suffix of schedule columns ("ipq+int8")


@dataclass
class Experiment:
    """A named selection: one task's rows and columns under a preset (the demo is one)."""

    doc: str = MISSING
    preset: str = MISSING
    task: str = MISSING
    modes: List[str] = MISSING
    columns: List[str] = MISSING
    table: str = "grid"  # what it renders: grid, ablation or frontier (reproduce.py --table)


def _typed(node, schema, where: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise GridError(f"{where}{': key ' + key if key else ''}: {str(e).splitlines()[0]}") from None


def _load(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise GridError(f"{path}: file not found") from None
    except Exception as e:  # yaml syntax
        raise GridError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise GridError(f"{path}: expected a mapping")
    return node


def _entries(path: Path, node: DictConfig, schema, prefix: str = "") -> dict:
    """Type-check each entry on its own, so an error names it (`lm.yaml: modes.none: key flags: ...`)."""
    return {str(name): _typed(value, schema, f"{shown(path)}: {prefix}{name}") for name, value in node.items()}


def shown(path: Path) -> str:
    """A path for messages: relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


PLAN_PREFIX = "plan_"  # a column planned by `quant-noise plan` for the bytes of its twin schedule column


@dataclass
class Grid:
    presets: Dict[str, Preset]
    packings: Dict[str, Packing]
    tasks: Dict[str, Task]
    experiments: Dict[str, Experiment]

    # -- columns ------------------------------------------------------------------------------

    def check_column(self, task: str, preset: str, column: str) -> None:
        method, _, suffix = column.partition("+")
        schedules = getattr(self.presets[preset], task).schedules
        if method == "fp32" or method in self.packings:
            ok = not suffix
        elif method.startswith(PLAN_PREFIX) and method[len(PLAN_PREFIX):] in schedules:  # `quant-noise plan` at that column's bytes
            ok = not suffix
        elif method in getattr(self.presets[preset], task).targets:
            ok = not suffix
        else:
            ok = method in schedules and (not suffix or (suffix in self.packings and self.packings[suffix].after_ipq))
        if not ok:
            known = ["fp32", *self.packings, *schedules, *(PLAN_PREFIX + s for s in schedules), *getattr(self.presets[preset], task).targets, *(f"{s}+{p}" for s in schedules for p, k in self.packings.items() if k.after_ipq)]
            raise GridError(f"unknown column {column!r} for {task} under preset {preset} (known: {', '.join(known)})")

    # -- rows ---------------------------------------------------------------------------------

    def mode(self, task: str, name: str) -> Mode:
        modes = self.tasks[task].modes
        if name not in modes:
            raise GridError(f"unknown mode {name!r} (known: {', '.join(modes)})")
        return modes[name]

    def table(self, task: str, kind: str) -> Tuple[List[str], List[str]]:
        """(modes, columns) a table shows unless told otherwise."""
        table = self.tasks[task].tables[kind]
        return list(self.tasks[task].modes) if table.modes is None else list(table.modes), list(table.columns)


def load_grid(configs: Path = CONFIGS) -> Grid:
    """Read presets.yaml, columns.yaml, experiments.yaml and one file per task; check every cross-reference."""
    presets = _entries(configs / "presets.yaml", _load(configs / "presets.yaml"), Preset)
    packings = _entries(configs / "columns.yaml", _load(configs / "columns.yaml"), Packing)
    experiments = _entries(configs / "experiments.yaml", _load(configs / "experiments.yaml"), Experiment)
    tasks = {}
    for task in TASKS:
        path = configs / f"{task}.yaml"
        node = _load(path)
        modes = _entries(path, node.pop("modes", OmegaConf.create({})), Mode, "modes.")
        tables = _entries(path, node.pop("tables", OmegaConf.create({})), Table, "tables.")
        tasks[task] = _typed(node, Task, shown(path))
        tasks[task].modes, tasks[task].tables = modes, tables
    grid = Grid(presets, packings, tasks, experiments)
    for task, spec in tasks.items():
        where = shown(configs / f"{task}.yaml")
        for name, mode in spec.modes.items():
            if mode.base is not None and mode.base not in spec.modes:
                raise GridError(f"{where}: modes.{name}: key base: unknown mode {mode.base!r}")
            if not re.fullmatch(r"preset|preset\+ipq|\d+(\.\d+)?%", mode.updates):
                raise GridError(f"{where}: modes.{name}: key updates: {mode.updates!r} (use preset, preset+ipq or N%)")
        for kind in ("grid", "ablation"):
            if kind not in spec.tables:
                raise GridError(f"{where}: key tables.{kind}: missing")
            for name in spec.tables[kind].modes or []:
                if name not in spec.modes:
                    raise GridError(f"{where}: tables.{kind}: unknown mode {name!r}")
    for name, preset in presets.items():
        for task in TASKS:
            spec = getattr(preset, task)
            if spec.lr_scheduler not in LR_SCHEDULERS:
                raise GridError(f"{shown(configs / 'presets.yaml')}: {name}.{task}.lr_scheduler: {spec.lr_scheduler!r} (use {' or '.join(LR_SCHEDULERS)})")
            if spec.patience and not spec.keep_best:  # patience needs a validation each epoch, which keep_best turns on
                raise GridError(f"{shown(configs / 'presets.yaml')}: {name}.{task}.patience: needs keep_best: true")
            for column, path in getattr(preset, task).schedules.items():
                if "+" in column or column == "fp32" or column in packings:
                    raise GridError(f"{shown(configs / 'presets.yaml')}: {name}.{task}.schedules: {column!r} is not a schedule column name")
                if not (REPO / path).is_file():
                    raise GridError(f"{shown(configs / 'presets.yaml')}: {name}.{task}.schedules.{column}: no such file {path}")
    for name, exp in experiments.items():
        where = f"{shown(configs / 'experiments.yaml')}: {name}"
        if exp.preset not in presets or exp.task not in TASKS:
            raise GridError(f"{where}: unknown preset {exp.preset!r} or task {exp.task!r}")
        try:
            for mode in exp.modes:
                grid.mode(exp.task, mode)
            for column in exp.columns:
                grid.check_column(exp.task, exp.preset, column)
        except GridError as error:
            raise GridError(f"{where}: {error}") from None
    return grid


def updates_for(grid: Grid, preset: Preset, task: str, mode: str, ipq_updates) -> int:
    """Training updates of a row's own run (a finetuning row: the updates after its base).

    ``ipq_updates``: a callable giving the "ipq" schedule's length, read only for "preset+ipq" rows.
    """
    own = getattr(preset, task).updates
    spec = grid.mode(task, mode).updates
    if spec == "preset":
        return own
    if spec == "preset+ipq":
        return own + ipq_updates()
    return max(1, round(own * float(spec.rstrip("%")) / 100))


def resolve_flags(flags: List[str], updates: int) -> List[str]:
    """"{N%}" placeholders become N% of the row's own training updates."""
    return [re.sub(r"\{(\d+)%\}", lambda m: str(round(updates * int(m.group(1)) / 100)), f) for f in flags]
