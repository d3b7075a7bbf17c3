"""Steps shared by the demo and the reproduction: each one a real fairseq / quant-noise CLI call.

Output streams through (fairseq's own progress logs), so every stage is visible as it runs.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(REPO / "quant_noise_plugin")
BIN = Path(sys.executable).parent


def device_flags() -> List[str]:
    """fairseq runs on the CPU unless QN_DEVICE=cuda (reproduce.py --device cuda) asks for the GPU."""
    return ["--cpu"] if os.environ.get("QN_DEVICE", "cpu") == "cpu" else []


def sh(cmd: List, log: Optional[Path] = None) -> str:
    """Run a command, echo its output live, return it; exit with its status on failure."""
    cmd = [str(c) for c in cmd]
    if (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not re.search(r"UserWarning|warnings.warn|FutureWarning|DeprecationWarning|tensorboardX|faiss.loader|swigfaiss", line):
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


def run_once(save: Path, cmd: List, log_name: str) -> None:
    """Run a fairseq-train command unless it already finished in ``save``.

    fairseq resumes an interrupted run from checkpoint_last.pt; a finished one would still take
    one more update when restarted, so finished runs are marked and skipped.
    """
    done = save / "DONE"
    if done.exists():
        print(f"[done] {save}", flush=True)
        return
    sh(cmd, save / log_name)
    done.write_text("finished\n")


def train_lm(data: Path, save: Path, arch: str, noise: List[str], max_update: int, seed: int = 1, extra: List[str] = ()) -> None:
    run_once(save, [
        "fairseq-train", data, "--user-dir", PLUGIN, "--task", "language_modeling", "--arch", arch, *noise,
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "0.5", "--lr", "0.001",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--dropout", "0.1",
        "--tokens-per-sample", "128", "--max-tokens", "2048", "--max-update", max_update, "--seed", seed,
        "--save-dir", save, "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "50",
        "--validate-interval-updates", max_update, *device_flags(), "--num-workers", "0", *extra,
    ], "train.log")


def ipq_lm(data: Path, save: Path, arch: str, dense: Path, schedule: Path, max_update: int, extra: List[str] = ()) -> None:
    run_once(save, [
        "fairseq-train", data, "--user-dir", PLUGIN, "--task", "ipq_language_modeling", "--ipq-config", schedule,
        "--finetune-from-model", dense, "--arch", arch, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
        "--clip-norm", "0.5", "--lr", "0.0002", "--tokens-per-sample", "128", "--max-tokens", "2048",
        "--max-update", max_update, "--save-dir", save, "--no-epoch-checkpoints", "--log-format", "simple",
        "--log-interval", "50", "--validate-interval-updates", max_update, *device_flags(), "--num-workers", "0", *extra,
    ], "ipq.log")


def eval_lm(data: Path, path: Path, subset: str = "test") -> float:
    out = sh(["fairseq-eval-lm", data, "--user-dir", PLUGIN, "--path", path, "--gen-subset", subset, *device_flags(),
              "--tokens-per-sample", "128", "--max-tokens", "4096", "--context-window", "64"])
    return float(out.rsplit("Perplexity:", 1)[1].split()[0])


def pack(src: Path, dst: Path, *flags, reuse: bool = False) -> int:
    """`quant-noise pack SRC DST FLAGS...`; with ``reuse``, an existing DST is kept. Returns its bytes."""
    if not (reuse and dst.exists()):
        sh(["quant-noise", "pack", src, dst, *flags])
    return dst.stat().st_size


def size_report(path: Path) -> dict:
    out = subprocess.run([str(BIN / "quant-noise"), "size", str(path), "--json"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return json.loads(out[out.index("{"):])


os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
