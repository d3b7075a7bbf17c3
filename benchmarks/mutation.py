"""Mutation check: do the fast unit tests fail when the code they guard is grossly wrong?

Each mutant changes one spot of a module (an arithmetic or comparison operator, ``and``/``or``, a
number, a ``not``, a loop's iterable emptied) and runs that module's fast tests against it; a mutant
is killed when a test fails (or runs past the time limit). What survives is either a gap in the tests
or an equivalent mutant (one that cannot change behaviour): the latter are listed in EQUIVALENT
below, each with why, and the report shows every survivor with its diff and that reason (or none).

  python benchmarks/mutation.py                       # every mutant of the seven modules (~840, ~5 min on 2 cores)
  python benchmarks/mutation.py --per-module 40        # a sample of 40 a module (seed 0): ~1.5 min
  python benchmarks/mutation.py --modules sizes        # one module

Writes results/mutation.{md,json}. The tests run single-process (no pytest-xdist) in a child forked
from a parent that imported torch, fairseq and pytest once, two children at a time; the mutated
module is served to the child by an import hook, so the files on disk never change.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.abc
import importlib.util
import json
import os
import random
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

for _pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # children are forked: no thread pool may
    os.environ[_pool] = "1"  # exist before the fork (a forked child's BLAS call would wait on threads it does not have)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "quant_noise_plugin"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The fast tests that guard each module (no CLI, no training: seconds each).
FAST_TESTS: Dict[str, List[str]] = {
    "sizes": ["tests/test_sizes.py", "tests/test_compressed.py"],
    "schedule": ["tests/test_schedule.py"],
    "pq": ["tests/test_pq.py", "tests/test_kmeans_pq.py", "tests/test_sizes.py", "tests/test_compressed.py"],
    "scalar": ["tests/test_scalar.py", "tests/test_sizes.py", "tests/test_compressed.py"],
    "bitpack": ["tests/test_kmeans_pq.py", "tests/test_sizes.py"],
    "gptq": ["tests/test_gptq.py", "--deselect", "tests/test_gptq.py::test_pack_with_error_feedback_beats_round_to_nearest_at_int2"],
    "integrity": ["tests/test_integrity.py"],
}
TIMEOUT_S = 60.0

# Survivors that cannot change behaviour, keyed by "module: mutated line" (the line as the mutant reads, stripped).
EQUIVALENT: Dict[str, str] = {
    "schedule: modules = dict(model.named_modules(remove_duplicate=(True)))":
        "plan_schedule only looks up names[0], the first name its module is registered under, which remove_duplicate keeps",
    "scalar: def packed_state(self, float_dtype: torch.dtype = torch.float16, centroid_bits=None, symmetric: bool = (True)) -> Dict[str, Tensor]:":
        "ScalarCodes.packed_state ignores `symmetric` (fit chose the grid already): the argument is the providers' shared signature",
    "gptq: BLOCK = (129)  # columns updated together: the error of a block reaches the later columns in one matmul":
        "the lazy block only batches the same updates (test_the_lazy_block_only_batches_the_update: blocks of 16, 96, 128 give one result)",
    "gptq: BLOCK = (127)  # columns updated together: the error of a block reaches the later columns in one matmul":
        "the lazy block only batches the same updates (test_the_lazy_block_only_batches_the_update: blocks of 16, 96, 128 give one result)",
    "gptq: h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[(1)], dtype=h.dtype)": "H is square",
    "gptq: h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[(-1)], dtype=h.dtype)": "H is square",
    "gptq: q = torch.clamp(torch.round(column / scale[:, (-1)]) + zero_point[:, 0], 0, qmax)": "the scales are (rows, 1): column -1 is column 0",
    "gptq: q = torch.clamp(torch.round(column / scale[:, 0]) + zero_point[:, (-1)], 0, qmax)": "the zero points are (rows, 1): column -1 is column 0",
    "gptq: error = (column - (q - zero_point[:, (-1)]) * scale[:, 0]) / u[i, i]": "the zero points are (rows, 1): column -1 is column 0",
    "gptq: error = (column - (q - zero_point[:, 0]) * scale[:, (-1)]) / u[i, i]": "the scales are (rows, 1): column -1 is column 0",
    "sizes: code_bytes = math.ceil((math.prod(shape) / block_size) * bits_for(n_centroids) / 8)":
        "the block size divides the weight's columns (pq.check_pq_shape), so the division is exact",
    "sizes: rows.append(SizeRow(name, tuple(tensor.shape), label, None, None, (8 * nbytes // max(1, tensor.numel())), nbytes))":
        "8 x bytes / elements is 8 x the element size, an integer: floor division changes nothing",
    "schedule: return (self.n_weights // self.block_size) * bits_for(self.n_centroids) / 8 + self.n_centroids * self.block_size * 2":
        "the block size divides the weight's columns (pq.check_pq_shape), so the division is exact",
    "scalar: zero_point = torch.clamp(torch.round(-lo / scale), (-1), qmax)": "lo is clamped to <= 0 first: -lo / scale >= 0",
    "scalar: codes = torch.clamp(torch.round(weight.detach().float() / scale) + zero_point, (-1), 2**bits - 1)":
        "a min-max grid: round(w / scale) >= round(lo / scale) = -zero_point (round is odd), so no code is below 0",
    "scalar: out.round_().add_(zero_point).clamp_((-1), 2**bits - 1).sub_(zero_point).mul_(scale)":
        "a min-max grid: round(w / scale) >= round(lo / scale) = -zero_point (round is odd), so no code is below 0",
    "gptq: f = (2.0) if row_weights is None else row_weights.double().reshape(-1, 1)":
        "a scalar weight on every row cancels in the ratio output_error returns",
}

# each operator and what it may turn into (cosmic-ray's and mutmut's usual replacements, a few a spot)
_BINOPS = {ast.Add: (ast.Sub, ast.Mult), ast.Sub: (ast.Add,), ast.Mult: (ast.Div, ast.Pow, ast.LShift),
           ast.Div: (ast.Mult, ast.FloorDiv), ast.FloorDiv: (ast.Mult, ast.Div), ast.Mod: (ast.FloorDiv,), ast.Pow: (ast.Mult,),
           ast.LShift: (ast.RShift,), ast.RShift: (ast.LShift,), ast.BitAnd: (ast.BitOr,), ast.BitOr: (ast.BitAnd,)}
_COMPARES = {ast.Lt: (ast.LtE, ast.GtE), ast.LtE: (ast.Lt, ast.Gt), ast.Gt: (ast.GtE, ast.LtE), ast.GtE: (ast.Gt, ast.Lt),
             ast.Eq: (ast.NotEq,), ast.NotEq: (ast.Eq,), ast.In: (ast.NotIn,), ast.NotIn: (ast.In,), ast.Is: (ast.IsNot,),
             ast.IsNot: (ast.Is,)}


@dataclass
class Mutant:
    module: str
    line: int
    operator: str
    before: str  # the source line as it is
    after: str  # the line as the mutant reads
    source: str  # the whole mutated module
    killed: Optional[bool] = None
    how: str = ""  # "failed", "timeout" or "survived"

    @property
    def key(self) -> str:
        return f"{self.module}: {self.after.strip()}"


def _segment_replacements(node: ast.AST):
    """(operator name, node to splice in place of ``node``) for each mutation of ``node`` itself."""
    if isinstance(node, ast.BinOp):
        for other in _BINOPS.get(type(node.op), ()):
            yield f"{type(node.op).__name__}->{other.__name__}", ast.BinOp(node.left, other(), node.right)
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for other in _COMPARES.get(type(op), ()):
                ops = list(node.ops)
                ops[i] = other()
                yield f"{type(op).__name__}->{other.__name__}", ast.Compare(node.left, ops, node.comparators)
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield f"{type(node.op).__name__}->{type(other).__name__}", ast.BoolOp(other, node.values)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield f"drop {type(node.op).__name__}", node.operand
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
        yield "number+1", ast.Constant(node.value + 1)
        yield "number-1", ast.Constant(node.value - 1)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield "not bool", ast.Constant(not node.value)


def _skipped_spans(tree: ast.AST):
    """Nodes whose insides are not behaviour worth mutating: docstrings, annotations, f-string text, logging."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from (a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation is not None)
            if node.returns is not None:
                yield node.returns
        if isinstance(node, ast.AnnAssign):
            yield node.annotation
        if isinstance(node, ast.JoinedStr):
            yield node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("debug", "info", "warning"):
            yield node


def mutants_of(module: str) -> List[Mutant]:
    path = REPO / PACKAGE / f"{module}.py"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    skipped = {id(n) for span in _skipped_spans(tree) for n in ast.walk(span)}
    out = []

    def splice(node, replacement: str) -> Optional[Mutant]:
        if node.lineno != node.end_lineno:
            return None  # one-line spots only: the report shows a one-line diff
        raw = lines[node.lineno - 1].encode()
        new = raw[: node.col_offset] + replacement.encode() + raw[node.end_col_offset:]
        mutated = lines[: node.lineno - 1] + [new.decode()] + lines[node.lineno:]
        return Mutant(module, node.lineno, "", raw.decode().rstrip("\n"), new.decode().rstrip("\n"), "".join(mutated))

    for node in ast.walk(tree):
        if id(node) in skipped or not hasattr(node, "lineno"):
            continue
        for operator, replacement in _segment_replacements(node):
            mutant = splice(node, f"({ast.unparse(replacement)})")
            if mutant is not None:
                mutant.operator = operator
                out.append(mutant)
        if isinstance(node, ast.For):
            mutant = splice(node.iter, "[]")
            if mutant is not None:
                mutant.operator = "empty loop"
                out.append(mutant)
    unique = {m.after: m for m in out if m.after != m.before}  # one mutant per distinct mutated line
    return sorted(unique.values(), key=lambda m: (m.line, m.after))


class _MutatedSource(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module's mutated source in place of its file."""

    def __init__(self, fullname: str, path: Path, source: str):
        self.fullname, self.path, self.source = fullname, path, source

    def find_spec(self, fullname, path, target=None):
        if fullname == self.fullname:
            return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = str(self.path)
        exec(compile(self.source, str(self.path), "exec"), module.__dict__)


def _run_tests(tests: List[str], mutant: Optional[Mutant]) -> None:
    """In a forked child: install the mutant, run the tests quietly, exit with pytest's code."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if mutant is not None:
        sys.meta_path.insert(0, _MutatedSource(f"{PACKAGE}.{mutant.module}", REPO / PACKAGE / f"{mutant.module}.py", mutant.source))
    import pytest

    code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=", "--rootdir", str(REPO),
                        *tests])  # paths from the repository root, the working directory
    os._exit(int(code))


def _start(tests: List[str], mutant: Optional[Mutant]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            _run_tests(tests, mutant)
        finally:
            os._exit(99)
    return pid


def run_all(jobs: List[tuple], parallel: int, on_done) -> None:
    """Run (tests, mutant or None for the code as it is, tag) jobs, ``parallel`` children at a time;
    on_done(tag, exit code or None on timeout)."""
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            tests, mutant, tag = pending.pop(0)
            running[_start(tests, mutant)] = (tag, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            tag, _ = running.pop(pid)
            on_done(tag, os.waitstatus_to_exitcode(status))
            continue
        for pid, (tag, started) in list(running.items()):
            if time.monotonic() - started > TIMEOUT_S:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                running.pop(pid)
                on_done(tag, None)
        select.select([], [], [], 0.05)


def render(results: Dict[str, List[Mutant]], args, seconds: float) -> tuple:
    """(notes, table): the summary per module, then every survivor with its diff and why it is equivalent."""
    sampled = f"a sample of {args.per_module} mutants a module (seed {args.seed})" if args.per_module else "every mutant"
    notes = (f"{sampled}, {seconds / 60:.1f} min on {args.parallel} processes. A mutant is killed when one of its module's fast "
             "tests fails (or runs past the time limit); a survivor is either a test gap or equivalent (it cannot change "
             "behaviour: the reason beside it).")
    lines = ["| module | fast tests | mutants | killed | killed % | survivors explained |", "|---|---|---:|---:|---:|---:|"]
    for module, mutants in results.items():
        killed = sum(bool(m.killed) for m in mutants)
        survivors = [m for m in mutants if not m.killed]
        explained = sum(m.key in EQUIVALENT for m in survivors)
        tests = ", ".join(sorted({t.split("::")[0][len("tests/"):] for t in FAST_TESTS[module] if t.startswith("tests/") and "::" not in t}))
        lines.append(f"| {module}.py | {tests} | {len(mutants)} | {killed} | {100 * killed / max(1, len(mutants)):.0f}% | "
                     f"{explained} of {len(survivors)} |")
    for module, mutants in results.items():
        survivors = [m for m in mutants if not m.killed]
        if survivors:
            lines += ["", f"Survivors in {module}.py:", ""]
        for m in survivors:
            lines += [f"- line {m.line} ({m.operator}): {EQUIVALENT.get(m.key, '**not explained: a test gap**')}", "  ```diff",
                      f"  - {m.before.strip()}", f"  + {m.after.strip()}", "  ```"]
    return notes, "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=list(FAST_TESTS), choices=list(FAST_TESTS))
    parser.add_argument("--per-module", type=int, default=0, help="a sample of this many mutants a module (default: every one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)

    import torch  # noqa: F401  (imported once, before the children fork)
    torch.set_num_threads(1)
    import fairseq  # noqa: F401
    import pytest  # noqa: F401

    os.chdir(REPO)
    start = time.monotonic()
    baseline = {}
    run_all([(FAST_TESTS[m], None, m) for m in args.modules], args.parallel, baseline.__setitem__)
    failing = [m for m, code in baseline.items() if code != 0]
    if failing:
        print(f"error: the fast tests of {', '.join(failing)} fail (or time out) on the code as it is: fix them first", file=sys.stderr)
        return 1
    chosen: Dict[str, List[Mutant]] = {}
    for module in args.modules:
        mutants = mutants_of(module)
        if args.per_module and len(mutants) > args.per_module:
            mutants = sorted(random.Random(f"{args.seed}:{module}").sample(mutants, args.per_module), key=lambda m: m.line)
        chosen[module] = mutants
    jobs = [(FAST_TESTS[m.module], m, m) for mutants in chosen.values() for m in mutants]
    done = [0]

    def on_done(mutant: Mutant, code: Optional[int]) -> None:
        mutant.killed = code != 0
        mutant.how = "timeout" if code is None else ("failed" if code else "survived")
        done[0] += 1
        if not mutant.killed:
            print(f"[{done[0]}/{len(jobs)}] survived: {mutant.key}", flush=True)

    run_all(jobs, args.parallel, on_done)
    seconds = time.monotonic() - start
    from _results import write_result

    notes, table = render(chosen, args, seconds)
    records = {module: [{**{k: v for k, v in asdict(m).items() if k != "source"}, "equivalent": EQUIVALENT.get(m.key)} for m in ms]
               for module, ms in chosen.items()}
    write_result("mutation", "Mutation check: the fast tests against gross mutations", table, notes,
                 {"per_module": args.per_module or None, "seed": args.seed, "seconds": round(seconds), "modules": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
