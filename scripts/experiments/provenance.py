"""Where a number came from, written so that anyone can rerun it: the command relative to the
repository (no machine's absolute path), the device, the commit."""
from __future__ import annotations

import shlex
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .grid import REPO


def portable(args: Iterable) -> str:
    """A command line with every absolute path made relative to the repository; a path outside it
    (a private output folder) keeps only its last part, as ".../name". Quoted for a shell where needed."""
    out = []
    for arg in map(str, args):
        path = Path(arg)
        if path.is_absolute():
            arg = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f".../{path.name}"
        out.append(arg)
    return shlex.join(out)


@lru_cache(maxsize=None)
def commit() -> str:
    """The checkout's commit ("-dirty" with uncommitted changes to tracked files), or "unknown"."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
