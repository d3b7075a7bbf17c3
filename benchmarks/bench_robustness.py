"""Faults and bad input, counted: results/robustness.md.

Every case runs one user-facing entry point (fairseq-eval-lm, fairseq-train, the hub's loader, a
`quant-noise` command) in a child process with a time limit, on a tiny model made at the start:
damaged packed files and training checkpoints (truncated, single bytes flipped, empty, a foreign
pickle, another architecture), broken iPQ schedules, plugin flags out of range, and faults (an iPQ
run SIGKILLed and rerun, `pack`/`unpack` killed mid-write, a full disk). Children are forked from a
server that has imported torch, fairseq and the plugin once, so a case costs its work, not imports.

Each case is classed:
  correct    the command did what the input allows: the model it loaded gives the original's logits
             bit for bit, a valid input was accepted, a resumed run ended with the straight run's codebooks;
  one-line   it stopped with exactly one `error:` line naming the culprit (file, YAML key, flag), no traceback,
             and left no partial output file;
  failure    anything else: a traceback, a hang, a silent wrong model, a partial file, an error that does
             not name the culprit, an invalid input accepted. Every failure is listed.

    python benchmarks/bench_robustness.py            # ~500 cases, a few minutes on 2 cores
    python benchmarks/bench_robustness.py --quick    # a handful per class (what tests/test_robustness.py runs)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(REPO / "quant_noise_plugin")
TIME_LIMIT_S = 300  # a hang; a loaded 2-core machine runs a tiny iPQ run in well under a minute

TINY_LM = ["--arch", "qn_transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
           "--decoder-attention-heads", "2", "--share-decoder-input-output-embed"]
TRAIN = ["--user-dir", PLUGIN, "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "1024",
         "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1", "--cpu", "--num-workers", "0", "--seed", "1"]
SCHEDULE = {
    "defaults": {"Linear": {"block_size": 4, "n_centroids": 16}, "Embedding": {"block_size": 4, "n_centroids": 16}},
    "kmeans_iterations": 10,
    "stages": [
        {"name": "ffn", "layers": r"decoder\.layers\.\d+\.fc[12]", "updates": 3},
        {"name": "attention_and_embeddings", "layers": r"decoder\.(layers\.\d+\.self_attn\.(q|k|v|out)_proj|embed_tokens)",
         "updates": 3, "objective": "activations"},
    ],
}


# ----------------------------------------------------------------------------------------------- children
def _logits_digest(path: str, data: str) -> None:
    """What the hub and every fairseq CLI do with a checkpoint (load_model_ensemble_and_task), then the logits' digest."""
    import torch
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(argparse.Namespace(user_dir=PLUGIN))
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    tokens = torch.arange(4, 36).remainder(len(task.source_dictionary)).view(2, 16)
    with torch.no_grad():
        logits = model(tokens)[0].float()
    print("DIGEST", hashlib.sha256(logits.numpy().tobytes()).hexdigest(), flush=True)


def _entry(argv: List[str]) -> Callable[[], object]:
    name = argv[0]
    if name == "quant-noise":
        from quant_noise_plugin.cli import main

        return lambda: sys.exit(main(argv[1:]))
    if name == "logits":
        return lambda: _logits_digest(*argv[1:])
    module = {"fairseq-train": "fairseq_cli.train", "fairseq-eval-lm": "fairseq_cli.eval_lm"}[name]
    import importlib

    return importlib.import_module(module).cli_main


def _child(argv: List[str], log: str, fsize_limit: Optional[int]) -> None:
    """Run one command as its console script would (sys.argv, excepthook at top level), output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)
    if fsize_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    sys.argv = [argv[0], *argv[1:]]
    code = 0
    try:
        _entry(argv)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["quant_noise_plugin", "quant_noise_plugin.cli", "fairseq_cli.train", "fairseq_cli.eval_lm"])
    return _CONTEXT


@dataclass
class Run:
    code: Optional[int]  # None: killed by the time limit
    output: str
    seconds: float


def run_child(argv: List[str], log: Path, time_limit: float = TIME_LIMIT_S, fsize_limit: Optional[int] = None,
              kill_when: Optional[Callable[[str, float], bool]] = None) -> Run:
    """Run ``argv`` in a forked child; ``kill_when(output_so_far, seconds)`` may SIGKILL it early (a fault)."""
    proc = _context().Process(target=_child, args=([str(a) for a in argv], str(log), fsize_limit))
    start = time.monotonic()
    proc.start()
    killed_early = False
    while proc.is_alive():
        elapsed = time.monotonic() - start
        if elapsed > time_limit:
            proc.kill()
            break
        if kill_when is not None and kill_when(log.read_text(errors="replace") if log.exists() else "", elapsed):
            os.kill(proc.pid, signal.SIGKILL)
            killed_early = True
            break
        proc.join(0.02 if kill_when is not None else 0.05)
    proc.join()
    timed_out = time.monotonic() - start > time_limit and not killed_early
    output = log.read_text(errors="replace") if log.exists() else ""
    return Run(None if timed_out else proc.exitcode, output, time.monotonic() - start)


# ----------------------------------------------------------------------------------------------- classing
@dataclass
class Case:
    group: str
    name: str
    argv: List[str]
    expect: str  # "ok": must succeed; "error": must be refused; "either": a correct result or a refusal
    culprit: str = ""  # what the error line must name ("a|b": either)
    digest: Optional[str] = None  # the logits a successful load must give
    output_file: Optional[str] = None  # must not be left partial (absent, or a whole file)
    fsize_limit: Optional[int] = None
    result: str = ""
    detail: str = ""
    seconds: float = 0.0


ERROR_LINE = re.compile(r"(^|\s)error: ")


def classify(case: Case, run: Run) -> None:
    case.seconds = run.seconds
    out = run.output
    tail = out.strip().splitlines()[-1][:300] if out.strip() else "(no output)"
    if run.code is None:
        case.result, case.detail = "failure", f"no answer after {TIME_LIMIT_S} s (hang)"
        return
    if "Traceback (most recent call last)" in out:
        case.result, case.detail = "failure", f"traceback: {tail}"
        return
    if case.output_file and not _whole_or_absent(Path(case.output_file)):
        case.result, case.detail = "failure", f"partial output file {Path(case.output_file).name}"
        return
    if run.code == 0:
        if case.expect == "error":
            case.result, case.detail = "failure", "accepted an invalid input"
            return
        if case.digest is not None:
            found = re.findall(r"DIGEST (\w+)", out)
            if not found or found[-1] != case.digest:
                case.result, case.detail = "failure", "loaded a model whose logits differ from the original's (silent wrong model)"
                return
        case.result = "correct"
        return
    errors = [line for line in out.splitlines() if ERROR_LINE.search(line)]
    if case.expect == "ok":
        case.result, case.detail = "failure", f"refused a valid input: {errors[-1] if errors else tail}"
    elif len(errors) != 1:
        case.result, case.detail = "failure", f"{len(errors)} error lines (exit {run.code}): {tail}"
    elif case.culprit and not any(part in errors[0] for part in case.culprit.split("|")):
        case.result, case.detail = "failure", f"error does not name {case.culprit!r}: {errors[0][:300]}"
    else:
        case.result, case.detail = "one-line", errors[0][:300]


def _whole_or_absent(path: Path) -> bool:
    """An output is absent or a torch file that loads whole (a partial zip does not)."""
    if not path.exists():
        return True
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------- fixtures
def sh(cmd: List, **kw) -> str:
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / str(cmd[0])
    cmd = [str(exe) if exe.exists() else str(cmd[0]), *map(str, cmd[1:])]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, **kw)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}")
    return result.stdout


def write_yaml(path: Path, content) -> Path:
    import yaml

    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def make_fixtures(work: Path) -> dict:
    """Tiny data, a trained LM, its iPQ run and packed file, a packed translation model (another task)."""
    f = {"work": work}
    sh(["quant-noise", "data", "--tiny", "--output", work / "data"])
    f["lm_data"] = work / "data" / "lm" / "bin"
    f["mt_data"] = work / "data" / "mt" / "bin"
    f["schedule"] = write_yaml(work / "schedule.yaml", SCHEDULE)
    sh(["fairseq-train", f["lm_data"], "--task", "language_modeling", "--tokens-per-sample", "64", *TRAIN, *TINY_LM, "--max-update", "30", "--save-dir", work / "dense"])
    f["dense"] = work / "dense" / "checkpoint_last.pt"
    f["ipq_cmd"] = ["fairseq-train", f["lm_data"], "--task", "ipq_language_modeling", "--ipq-config", f["schedule"], "--tokens-per-sample", "64",
                    "--finetune-from-model", f["dense"], *TRAIN, *TINY_LM, "--lr", "0.0005", "--max-update", "6"]
    sh([*f["ipq_cmd"], "--save-dir", work / "ipq"])
    f["ipq"] = work / "ipq" / "checkpoint_last.pt"
    sh(["quant-noise", "pack", f["ipq"], work / "packed.pt"])
    f["packed"] = work / "packed.pt"
    sh(["fairseq-train", f["mt_data"], "--task", "translation", "--arch", "qn_transformer", "--encoder-layers", "1", "--decoder-layers", "1",
        "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", *TRAIN, "--max-update", "2", "--save-dir", work / "mt"])
    sh(["quant-noise", "pack", work / "mt" / "checkpoint_last.pt", work / "mt_packed.pt", "--scalar-bits", "8"])
    f["mt_packed"] = work / "mt_packed.pt"
    f["mt"] = work / "mt" / "checkpoint_last.pt"
    return f


# ----------------------------------------------------------------------------------------------- cases
def file_cases(f: dict, digests: dict, n_flips: int, n_truncations: int, seed: int) -> List[Case]:
    """Damaged packed files and training checkpoints, through the loaders users call."""
    work, rng, cases = f["work"] / "files", random.Random(seed), []
    work.mkdir(exist_ok=True)
    lm = str(f["lm_data"])

    def loaders(path: Path, expect: str, group: str, name: str, culprit: str, which=("logits", "eval-lm", "size", "unpack")):
        out = []
        for entry in which:
            if entry == "logits":
                argv, digest, output = ["logits", path, lm], digests.get(group.split(":")[1]), None
            elif entry == "eval-lm":
                argv, digest, output = ["fairseq-eval-lm", lm, "--path", path, "--user-dir", PLUGIN, "--cpu", "--max-tokens", "1024",
                                        "--tokens-per-sample", "64"], None, None
            elif entry == "size":
                argv, digest, output = ["quant-noise", "size", path, "--data", lm], None, None
            else:
                output = str(path) + ".unpacked.pt"
                argv, digest = ["quant-noise", "unpack", path, output, "--data", lm], None
            out.append(Case(group, f"{name} via {entry}", argv, expect, culprit, digest, output))
        return out

    for kind in ("packed", "ipq", "dense"):
        blob = Path(f[kind]).read_bytes()
        group = f"file:{kind}"
        for i in range(n_truncations):
            cut = int(len(blob) * (i + 0.5) / n_truncations)
            path = work / f"{kind}_cut{cut}.pt"
            path.write_bytes(blob[:cut])
            which = ("logits", "eval-lm", "size", "unpack")[i % 4: i % 4 + 1] if kind != "packed" else ("logits", "size")
            cases += loaders(path, "error", group, f"truncated at byte {cut} of {len(blob)}", path.name, which)
        if kind == "packed":  # every flip inside tensor data must be caught (the checksums' claim)
            ranges = tensor_data_ranges(Path(f[kind]))
            for i in range(n_flips // 4):
                start, end = rng.choices(ranges, weights=[e - s for s, e in ranges])[0]
                offset = rng.randrange(start, end)
                damaged = bytearray(blob)
                damaged[offset] ^= rng.randrange(1, 256)
                path = work / f"{kind}_dataflip{offset}.pt"
                path.write_bytes(bytes(damaged))
                cases += loaders(path, "error", "file:packed-tensor-data", f"byte {offset} (tensor data) flipped", path.name,
                                 (("logits", "eval-lm", "size", "unpack")[i % 4],))
        flips = n_flips if kind == "packed" else n_flips // 2
        for i in range(flips):
            offset = rng.randrange(len(blob))
            damaged = bytearray(blob)
            damaged[offset] ^= rng.randrange(1, 256)
            path = work / f"{kind}_flip{offset}.pt"
            path.write_bytes(bytes(damaged))
            cases += loaders(path, "either", group, f"byte {offset} of {len(blob)} flipped", path.name, ("logits",))
        empty = work / f"{kind}_empty.pt"
        empty.write_bytes(b"")
        cases += loaders(empty, "error", group, "empty file", empty.name)
    foreign = work / "foreign_pickle.pt"
    import pickle

    foreign.write_bytes(pickle.dumps({"model": {"w": [1, 2, 3]}, "cfg": None}))
    cases += loaders(foreign, "error", "file:other", "a plain pickle (not a torch file)", foreign.name)
    evil = work / "evil_pickle.pt"
    _write_evil(evil)
    cases += loaders(evil, "error", "file:other", "a torch file whose pickle runs code", evil.name)
    for kind in ("mt", "mt_packed"):
        if kind not in f:
            continue
        cases += loaders(Path(f[kind]), "error", "file:other", f"a translation model ({kind}) given as the LM", f"translation|{Path(f[kind]).name}",
                         ("logits", "eval-lm", "size"))
    return cases


def tensor_data_ranges(path: Path) -> List[tuple]:
    """(start, end) byte offsets of each tensor's data inside a torch zip file."""
    import struct
    import zipfile

    ranges = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size > 0:
                fh.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", fh.read(30)[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                ranges.append((start, start + info.compress_size))
    return ranges


def _write_evil(path: Path) -> None:
    """A torch file whose unpickling would call os.system (the safe loader must refuse it, never run it)."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path}.pwned",))

    torch.save({"model": {}, "cfg": Evil()}, path)


def schedule_cases(f: dict) -> List[Case]:
    """Every key deleted, every value of the wrong type, regexes matching nothing or everything, overlapping stages,
    non-positive numbers, a block size that does not divide its layer; through `quant-noise schedule` and the iPQ task."""
    import copy

    work = f["work"] / "schedules"
    work.mkdir(exist_ok=True)
    variants = []  # (name, schedule, expect, culprit)

    def paths(node, prefix=()):
        if isinstance(node, dict):
            for k, v in node.items():
                yield prefix + (k,), v
                yield from paths(v, prefix + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield prefix + (i,), v
                yield from paths(v, prefix + (i,))

    def edited(path, value=None, delete=False):
        s = copy.deepcopy(SCHEDULE)
        node = s
        for k in path[:-1]:
            node = node[k]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return s

    # optional keys: the built-in defaults (block_size 8, n_centroids 256, 20 iterations) or the schedule's objective
    optional = {("kmeans_iterations",), ("stages", 1, "objective")}
    for path, value in list(paths(SCHEDULE)):
        key = path[-1]
        label = ".".join(map(str, path))
        culprit = str(key) if not isinstance(key, int) else "stage"
        if isinstance(key, int) and path[0] == "stages":
            continue  # a whole stage: covered by the stage list cases below
        # deleting a default block_size/n_centroids leaves a layer with no setting: refused; the rest are optional
        expect = "ok" if path in optional or path[0] == "defaults" else "error"
        variants.append((f"key {label} deleted", edited(path, delete=True), expect, culprit))
        wrong = {str: 7, int: "seven", dict: [1, 2], list: {"a": 1}}.get(type(value), "x")
        if path[-1] == "layers":
            wrong = ["a", "b"]
        # a number where a stage's name (a label) is expected reads as that label
        expect = "either" if key == "name" else "error"
        variants.append((f"key {label} of the wrong type ({type(wrong).__name__})", edited(path, wrong), expect, culprit))
    variants.append(("stages empty", edited(("stages",), []), "error", "stages"))
    variants.append(("unknown top-level key", {**copy.deepcopy(SCHEDULE), "stagez": []}, "error", "stagez"))
    variants.append(("unknown stage key", edited(("stages", 0, "updatez"), 3), "error", "updatez"))
    variants.append(("unknown objective", edited(("stages", 1, "objective"), "gradients"), "error", "objective"))
    variants.append(("regex matching nothing", edited(("stages", 0, "layers"), r"decoder\.nothing\d+"), "error", "layers"))
    variants.append(("regex matching everything", edited(("stages", 0, "layers"), ".*"), "either", "already quantized by stage ffn"))
    variants.append(("regex that does not compile", edited(("stages", 0, "layers"), "decoder.(fc"), "error", "layers"))
    variants.append(("stages overlapping", edited(("stages", 1, "layers"), r"decoder\.layers\.0\.fc1"), "error", "decoder.layers.0.fc1"))
    for number in (0, -3):
        variants.append((f"updates {number}", edited(("stages", 0, "updates"), number), "error", "updates"))
        variants.append((f"n_centroids {number}", edited(("defaults", "Linear", "n_centroids"), number), "error", "n_centroids"))
        variants.append((f"block_size {number}", edited(("defaults", "Linear", "block_size"), number), "error", "block_size"))
        variants.append((f"kmeans_iterations {number}", edited(("kmeans_iterations",), number), "error", "kmeans_iterations"))
    variants.append(("block size that divides no layer (5)", edited(("defaults", "Linear", "block_size"), 5), "error", "block_size"))
    variants.append(("block size larger than the layer (4096)", edited(("defaults", "Embedding", "block_size"), 4096), "error", "block_size"))
    variants.append(("more centroids than blocks", edited(("defaults", "Linear", "n_centroids"), 1 << 20), "error", "n_centroids"))
    variants.append(("not a mapping (a list)", [1, 2, 3], "error", "schedule"))
    variants.append(("YAML syntax error", "stages: [\n  - {name: ffn", "error", "bad"))
    variants.append(("empty file", "", "error", "bad"))
    cases = []
    for i, (name, content, expect, culprit) in enumerate(variants):
        path = write_yaml(work / f"bad{i}.yaml", content)
        culprit = culprit if culprit != "bad" else path.name
        cases.append(Case("schedule:preview", f"{name} via quant-noise schedule", ["quant-noise", "schedule", f["dense"], path], expect, culprit))
        cmd = list(f["ipq_cmd"])
        cmd[cmd.index("--ipq-config") + 1] = path
        cmd[cmd.index("--max-update") + 1] = "1"
        cases.append(Case("schedule:ipq-task", f"{name} via fairseq-train --task ipq_language_modeling",
                          [*cmd, "--save-dir", work / f"run{i}", "--disable-validation", "--no-save"], expect, culprit))
    return cases


def flag_cases(f: dict) -> List[Case]:
    """Every plugin flag out of range, on the command that takes it."""
    work = f["work"] / "flags"
    work.mkdir(exist_ok=True)
    train = ["fairseq-train", f["lm_data"], "--task", "language_modeling", "--tokens-per-sample", "64", *TRAIN, *TINY_LM, "--max-update", "1", "--no-save",
             "--disable-validation"]  # each case its own --save-dir: fairseq writes and deletes save_dir/dummy, cases run in parallel
    bad = [("--quant-noise-pq", v) for v in ("-0.1", "1.5", "nan")] + [("--quant-noise-scalar", v) for v in ("-1", "2")] + \
          [("--quant-noise-scalar-bits", v) for v in ("0", "1", "9", "33")] + [("--quant-noise-pq-block-size", v) for v in ("0", "-8", "3")] + \
          [("--quant-noise-pq-embeddings", v) for v in ("-0.5", "1.01")] + [("--quant-noise-pq-centroids", v) for v in ("-1", "-256")] + \
          [("--quant-noise-pq-refit-updates", "0"), ("--quant-noise-activations", "-0.1"), ("--quant-noise-activations", "1.5"),
           ("--quant-noise-start-update", "-5"), ("--quant-noise-ramp-updates", "-5"), ("--quant-noise-exclude", "decoder.(fc")]
    needs_pq = {"--quant-noise-pq-block-size", "--quant-noise-pq-centroids", "--quant-noise-pq-refit-updates", "--quant-noise-start-update",
                "--quant-noise-ramp-updates", "--quant-noise-exclude"}
    cases = []
    for flag, value in bad:
        extra = ["--quant-noise-pq", "0.1"] if flag in needs_pq else (["--quant-noise-scalar", "0.5"] if flag == "--quant-noise-scalar-bits" else [])
        cases.append(Case("flags:train", f"{flag} {value}", [*train, "--save-dir", work / f"run{len(cases)}", *extra, flag, value], "error", flag))
    ipq = [*f["ipq_cmd"], "--no-save", "--disable-validation"]
    for flag, value in [("--ipq-calibration-batches", "0"), ("--ipq-calibration-batches", "-2"), ("--ipq-distill-weight", "-1"),
                        ("--ipq-kmeans-backend", "sklearn"), ("--ipq-distill-teacher", str(work / "missing.pt")),
                        ("--ipq-config", str(work / "missing.yaml"))]:
        argv = [*ipq, "--save-dir", work / f"ipq{len(cases)}"]
        if flag == "--ipq-config":
            argv[argv.index("--ipq-config") + 1] = value
        else:
            argv += [flag, value]
        culprit = "missing" if "missing" in value else flag
        cases.append(Case("flags:ipq-task", f"{flag} {value}", argv, "error", culprit))
    out = str(work / "packed.pt")
    for flags, culprit in [(["--scalar-bits", "5"], "--scalar-bits"), (["--scalar-bits", "0"], "--scalar-bits"),
                           (["--activation-bits", "4", "--calibrate", f["lm_data"]], "--activation-bits"),
                           (["--activation-bits", "8"], "--calibrate"),
                           (["--scalar-bits", "8", "--activation-bits", "8", "--calibrate", f["lm_data"], "--calibration-batches", "0"], "--calibration-batches"),
                           (["--observer", "median"], "--observer"), (["--calibrate", work / "nodata"], "--calibrate"),
                           (["--scalar-bits", "8", "--activation-bits", "8", "--calibrate", work / "nodata"], "nodata")]:
        cases.append(Case("flags:pack", " ".join(map(str, flags)), ["quant-noise", "pack", f["ipq"], out, *flags], "error", culprit, output_file=out))
    cases.append(Case("flags:schedule", "--calibration-batches 0",
                      ["quant-noise", "schedule", f["dense"], f["schedule"], "--calibrate", f["lm_data"], "--calibration-batches", "0"],
                      "error", "--calibration-batches"))
    return cases


# ----------------------------------------------------------------------------------------------- faults
def _model_tensors(path: Path) -> dict:
    import torch

    from quant_noise_plugin.integrity import CHECKSUM_KEY

    model = torch.load(path, map_location="cpu", weights_only=False)["model"]
    model.pop(CHECKSUM_KEY, None)  # exact bytes: the tensors are compared with a tolerance below
    return model


def _loads(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


def _same_model(a: dict, b: dict) -> Optional[str]:
    import torch

    if sorted(a) != sorted(b):
        return "different tensors"
    for key in a:
        if not torch.allclose(a[key].float(), b[key].float(), atol=1e-5):  # the resume test's tolerance
            return f"{key} differs"
    return None


def fault_cases(f: dict, n_kills: int, quick: bool = False) -> List[Case]:
    """SIGKILL an iPQ run at points spread over its log and rerun it; kill pack/unpack mid-write; fill the disk."""
    work = f["work"] / "faults"
    work.mkdir(exist_ok=True)
    cases = []
    straight_dir = work / "straight"
    straight = run_child([*f["ipq_cmd"], "--save-dir", straight_dir], work / "straight.log")
    if straight.code != 0:
        raise SystemExit(f"the uninterrupted iPQ run failed:\n{straight.output[-3000:]}")
    reference = _model_tensors(straight_dir / "checkpoint_last.pt")
    n_lines = len(straight.output.splitlines())
    for i in range(n_kills):
        at_line = int(n_lines * (i + 0.5) / n_kills)
        save = work / f"killed{i}"
        case = Case("fault:ipq-killed", f"killed (SIGKILL) at log line {at_line} of {n_lines}, rerun", [], "ok")
        first = run_child([*f["ipq_cmd"], "--save-dir", save], work / f"killed{i}.log",
                          kill_when=lambda out, _t, n=at_line: len(out.splitlines()) >= n)
        last_line = first.output.strip().splitlines()[-1][:120] if first.output.strip() else ""
        rerun = run_child([*f["ipq_cmd"], "--save-dir", save], work / f"rerun{i}.log")
        classify(case, rerun)
        if case.result == "correct":
            problem = _same_model(_model_tensors(save / "checkpoint_last.pt"), reference)
            if problem:
                case.result, case.detail = "failure", f"resumed run ends with other codebooks: {problem}"
        case.detail = case.detail or f"killed after: {last_line}"
        case.seconds = first.seconds + rerun.seconds
        cases.append(case)
    for command, source in (("pack", f["ipq"]), ("unpack", f["packed"])):
        probe = run_child(["quant-noise", command, source, work / f"{command}_probe.pt"], work / f"{command}_probe.log")
        duration = probe.seconds
        previous = (work / f"{command}_probe.pt").read_bytes()
        for i in range(n_kills):
            at = duration * (i + 0.5) / n_kills
            out = work / f"{command}_killed{i}.pt"
            keep_previous = i % 2 == 1
            if keep_previous:
                out.write_bytes(previous)
            case = Case(f"fault:{command}-killed", f"killed at {at:.2f} s of {duration:.2f} s" + (" over a previous file" if keep_previous else ""),
                        [], "either")
            run = run_child(["quant-noise", command, source, out], work / f"{command}_killed{i}.log", kill_when=lambda _o, t, at=at: t >= at)
            case.seconds = run.seconds
            if not out.exists():
                case.result, case.detail = "correct", "no output file"
            elif out.read_bytes() == previous:
                case.result, case.detail = "correct", "the previous file, whole"
            elif _whole_or_absent(out) and _loads(out):
                case.result, case.detail = "correct", "a whole new file (written before the kill)"
            else:
                case.result, case.detail = "failure", f"partial output file ({out.stat().st_size} bytes)"
            leftovers = list(work.glob(f"{out.name}.*.tmp"))
            if leftovers:
                case.detail += f"; {len(leftovers)} temporary file left (a SIGKILL runs no cleanup)"
            cases.append(case)
    # a file-size limit (RLIMIT_FSIZE) stands for a full disk; it also bounds the child's own log, so each limit
    # is above the command's log and below its output
    packed_size, ipq_size = Path(f["packed"]).stat().st_size, Path(f["ipq"]).stat().st_size
    for command, source, limits in (("pack", f["ipq"], (16384, packed_size // 2)), ("unpack", f["packed"], (16384, ipq_size // 4))):
        for limit in limits[:1] if quick else limits:
            out = work / f"{command}_full{limit}.pt"
            cases.append(Case("fault:disk-full", f"{command} with a {limit}-byte file-size limit", ["quant-noise", command, source, out],
                              "error", out.name, output_file=str(out), fsize_limit=limit))
    for limit in (ipq_size // 4,) if quick else (ipq_size // 4, ipq_size // 2):
        save = work / f"ipq_full{limit}"
        cases.append(Case("fault:disk-full", f"iPQ run with a {limit}-byte file-size limit (checkpoint save)",
                          [*f["ipq_cmd"], "--save-dir", save], "error", save.name, output_file=str(save / "checkpoint_last.pt"),
                          fsize_limit=limit))
    return cases


# ----------------------------------------------------------------------------------------------- main
def run_cases(cases: List[Case], workers: int, logs: Path) -> None:
    logs.mkdir(exist_ok=True)

    def one(item):
        i, case = item
        if case.result:  # faults are run and classed where they are built
            return
        run = run_child(case.argv, logs / f"case{i}.log", fsize_limit=case.fsize_limit)
        classify(case, run)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, enumerate(cases)))


def reference_digests(f: dict, logs: Path) -> dict:
    digests = {}
    for kind in ("packed", "ipq", "dense"):
        run = run_child(["logits", f[kind], f["lm_data"]], logs / f"reference_{kind}.log")
        found = re.findall(r"DIGEST (\w+)", run.output)
        if run.code != 0 or not found:
            raise SystemExit(f"the undamaged {kind} file does not load:\n{run.output[-3000:]}")
        digests[kind] = found[-1]
    return digests


def report(cases: List[Case], seconds: float, quick: bool, work: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import write_result

    for case in cases:  # no path of this machine in results/
        case.detail = case.detail.replace(str(work), "WORK").replace(str(REPO), ".")
        case.name = case.name.replace(str(work), "WORK").replace(str(REPO), ".")

    groups = sorted({c.group for c in cases}, key=lambda g: [c.group for c in cases].index(g))
    rows = ["| class of input | cases | correct result | one-line error | failure |", "|---|---:|---:|---:|---:|"]
    for g in groups:
        mine = [c for c in cases if c.group == g]
        rows.append(f"| {g} | {len(mine)} | " + " | ".join(str(sum(c.result == r for c in mine)) for r in ("correct", "one-line", "failure")) + " |")
    rows.append(f"| **all** | **{len(cases)}** | " + " | ".join(f"**{sum(c.result == r for c in cases)}**" for r in ("correct", "one-line", "failure")) + " |")
    failures = [c for c in cases if c.result == "failure"]
    listing = "\n".join(f"- {c.group}: {c.name}: {c.detail}" for c in failures) or "none"
    table = "\n".join(rows) + f"\n\nFailures:\n{listing}\n"
    notes = (f"Every case runs one entry point in a child process with a {TIME_LIMIT_S} s limit, on a tiny LM (2 x 64) trained, "
             f"compressed by a two-stage iPQ schedule and packed at the start; {len(cases)} cases in {seconds / 60:.1f} min on this machine. "
             "A loaded model is `correct` only if its logits equal the undamaged file's bit for bit; a refusal counts as `one-line` only "
             "with exactly one `error:` line naming the file, YAML key or flag, no traceback and no partial output file. "
             "Flipped bytes land anywhere in the file (zip headers, the pickled config, tensor data); a flip the format ignores "
             "(zip padding, a local header's name) loads the same model and counts as correct.")
    if quick:
        print(table)
        return
    data = [{k: getattr(c, k) for k in ("group", "name", "expect", "result", "detail", "seconds")} for c in cases]
    write_result("robustness", "Faults and bad input, counted", table, notes, data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of cases per class (the test suite's version)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", help="keep the fixtures and logs here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="where the flipped bytes fall")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    start = time.monotonic()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="robustness."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        f = make_fixtures(work)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        digests = reference_digests(f, logs)
        n_flips, n_cuts, n_kills = (6, 2, 2) if args.quick else (200, 20, 10)
        cases = file_cases(f, digests, n_flips, n_cuts, args.seed) + schedule_cases(f) + flag_cases(f)
        if args.quick:
            cases = cases[::7]
        cases += fault_cases(f, n_kills, args.quick)
        run_cases(cases, args.workers, logs)
        report(cases, time.monotonic() - start, args.quick, work)
        failures = sum(c.result == "failure" for c in cases)
        print(f"{len(cases)} cases, {failures} failures, {(time.monotonic() - start) / 60:.1f} min")
        return 1 if failures else 0
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
