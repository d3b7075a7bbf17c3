"""A cell: one row's model, compressed as one column, evaluated; computed once, then read from the cache."""
from __future__ import annotations

from typing import Optional

from .cache import Cells
from .grid import PLAN_PREFIX
from .metrics import evaluate
from .provenance import commit
from .runs import Runner


def device_name(device: str) -> str:
    """What computed a cell: 'cpu' or the CUDA device's name (recorded in each cell, shown in the tables)."""
    if device == "cpu":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def cell(runner: Runner, cells: Cells, task: str, mode: str, column: str, command: str, compute: bool = True) -> Optional[dict]:
    """The cell's cached result, else (when ``compute``) train / compress / evaluate what it needs."""
    seed = runner.preset.seed
    _, out, flags = runner.compressed_path(task, mode, column)
    identity = [out.name, runner.normalized(flags)]  # the file's name keys its chain (training command, schedule)
    cached = cells.get(task, mode, column, seed, identity, render_only=not compute)
    if cached is not None:
        print(f"[cached] {task} {mode} {column} seed {seed}")
        return cached
    if not compute:
        print(f"[missing] {task} {mode} {column} seed {seed}")
        return None
    path = runner.compressed(task, mode, column)
    if runner.dry_run:
        return None
    identity = [path.name, runner.normalized(flags)]  # a planned column's file is named once its plan exists
    result = {"task": task, "mode": mode, "column": column, "seed": seed, "preset": runner.preset_name, "bytes": path.stat().st_size,
              "checkpoint": str(path.relative_to(runner.work)), "train_updates": runner.total_budget(task, mode),
              "device": device_name(runner.device), "command": command, "commit": commit()}
    method = column.partition("+")[0]
    spec = getattr(runner.preset, task)
    if method in spec.schedules or method in spec.targets or method.startswith(PLAN_PREFIX):
        result["ipq_updates"] = runner.ipq_updates(task, method)
    result.update(evaluate(runner, task, path))
    cells.put(task, mode, column, identity, result)
    return result
