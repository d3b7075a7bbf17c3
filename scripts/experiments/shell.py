"""Running a CLI: its output streams through (fairseq's own progress logs), warnings filtered."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from .grid import REPO

PLUGIN = str(REPO / "quant_noise_plugin")
BIN = Path(sys.executable).parent
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))  # for the subprocesses
NOISE = re.compile(r"UserWarning|warnings.warn|FutureWarning|DeprecationWarning|tensorboardX|faiss.loader|swigfaiss")


def sh(cmd: List, log: Optional[Path] = None) -> str:
    """Run a command (the venv's console scripts first), echo its output live, return it; exit with its status on failure."""
    cmd = [str(c) for c in cmd]
    if (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not NOISE.search(line):
            sys.stdout.write(line)
            sys.stdout.flush()
    proc.wait()
    output = "".join(lines)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    if proc.returncode != 0:
        sys.exit(f"step failed ({proc.returncode}): {' '.join(cmd)}")
    return output


def pack_once(src: Path, dst: Path, *flags) -> None:
    """`quant-noise pack SRC DST FLAGS...` unless DST exists (benchmarks rerun on the same files)."""
    if not dst.exists():
        sh(["quant-noise", "pack", src, dst, *flags])


def size_report(path: Path) -> dict:
    """`quant-noise size PATH --json`."""
    out = subprocess.run([str(BIN / "quant-noise"), "size", str(path), "--json"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return json.loads(out[out.index("{"):])
