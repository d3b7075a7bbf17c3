"""What is already done: finished runs and computed cells, so a rerun continues where it stopped.

A run directory is named by the key of the command that makes it (data and work folders replaced
by placeholders, the device left out), so a changed flag, budget or base is another run and an
interrupted one resumes (fairseq restarts from checkpoint_last.pt). A cell is one JSON record
under WORK/cells, named by the key of the file it evaluates. With ``--render-only``, a cell not
in the cache is taken from the results folder's own JSON (the cells its tables were made from),
read by the caller (frontier records come back through ``frontier.as_cell``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .grid import DEFAULT_PRESET

DONE = "DONE"


def key(*parts) -> str:
    """The one cache key: 12 hex digits of the parts' JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finished(save: Path) -> bool:
    """fairseq would take one more update when restarted on a finished run: finished runs are marked."""
    return (save / DONE).exists()


def mark_finished(save: Path) -> None:
    (save / DONE).write_text("finished\n")


def write_atomic(path: Path, text: str) -> None:
    """Never a half-written result: a temporary file, then renamed."""
    from quant_noise_plugin.atomic import atomic_file  # imports fairseq: only when writing

    with atomic_file(path) as tmp:
        tmp.write_text(text)


def preset_of(record: dict) -> str:
    """The preset a stored record was computed under: its own key, else its command's --preset (records
    written before cells named their preset), else reproduce.py's default."""
    if "preset" in record:
        return record["preset"]
    words = str(record.get("command", "")).split()
    return words[words.index("--preset") + 1] if "--preset" in words[:-1] else DEFAULT_PRESET


class Cells:
    """The computed cells: WORK/cells/<task>-<mode>-<column>-<key>.json, plus (render-only) ``stored`` cells
    read from results JSONs, the first record of a cell winning; only those of ``preset`` are kept."""

    def __init__(self, work: Path, stored: Iterable[dict] = (), preset: Optional[str] = None):
        self.root = work / "cells"
        self.fallback: Dict[Tuple[str, str, str, int], dict] = {}
        for r in stored:
            if preset is None or preset_of(r) == preset:
                self.fallback.setdefault((r["task"], r["mode"], r["column"], r.get("seed", 1)), r)

    def path(self, task: str, mode: str, column: str, identity: List) -> Path:
        return self.root / f"{task}-{mode}-{column}-{key(*identity)}.json"

    def get(self, task: str, mode: str, column: str, seed: int, identity: List, render_only: bool = False) -> Optional[dict]:
        path = self.path(task, mode, column, identity)
        if path.exists():
            return json.loads(path.read_text())
        return self.fallback.get((task, mode, column, seed)) if render_only else None

    def put(self, task: str, mode: str, column: str, identity: List, result: dict) -> None:
        write_atomic(self.path(task, mode, column, identity), json.dumps(result))
