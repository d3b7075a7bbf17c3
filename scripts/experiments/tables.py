"""The grid tables (results/lm_kjv.md, mt_en_es.md, cls_kjv_pairs.md): each cell its metric, size on
disk and ratio to fp32; with several seeds their mean, then each. Pure text from the cells' records."""
from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Tuple

from .metrics import metric_of
from .provenance import commit, portable
from .runs import Runner

TITLES = {"lm": "Perplexity on the KJV test split (lower is better)",
          "mt": "BLEU (sacrebleu, detokenized) on the KJV->RV1909 test split",
          "cls": "Accuracy (%) on the KJV verse-pair test split (next verse / same chapter / another book)"}
TABLE_FILES = {"lm": "lm_kjv.md", "mt": "mt_en_es.md", "cls": "cls_kjv_pairs.md"}


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


def schedules_text(runner: Runner, task: str, columns: Iterable[str]) -> str:
    """"ipq = `configs/ipq/...yaml`, ..." for the schedule columns shown."""
    methods = {c.partition("+")[0] for c in columns}
    return ", ".join(f"{c} = `{portable([runner.schedule(task, c)])}`" for c in getattr(runner.preset, task).schedules if c in methods)


def provenance(cells: Iterable[dict]) -> str:
    """One line per (device, commit, command) that computed some of the cells: a table may merge several runs."""
    runs = {}
    for r in cells:
        where = r.get("device", "not recorded") + (f", commit {r['commit']}" if r.get("commit") else "")
        runs.setdefault((where, r.get("command", "not recorded")), []).append(r["mode"])
    return "\n".join(f"- {where}: `{command}` ({', '.join(sorted(set(modes)))})" for (where, command), modes in runs.items())


def command_line(command: str) -> str:
    """The table's last line: what rendered it, and at which commit (`--render-only` reruns it)."""
    return f"Command: `{command}` (commit {commit()})\n"


def legend(runner: Runner, task: str, modes: List[str]) -> str:
    lines = []
    for m in modes:
        spec = runner.grid.mode(task, m)
        budget = f"{runner.total_budget(task, m)} training updates" + (f" ({spec.base} + {runner.budget(task, m)} finetuning)" if spec.base else "")
        ipq = f"; iPQ runs add `{' '.join(spec.ipq_flags)}`" if spec.ipq_flags else ""
        lines.append(f"- `{m}`: {spec.doc}: `{' '.join(runner.mode_flags(task, m)) or '(no flags)'}`; {budget}{ipq}")
    return "\n".join(lines)


def render(results: List[dict], task: str, modes: List[str], columns: List[str], runner: Runner, seeds: List[int],
           command: str, baselines: str = "") -> str:
    """The grid table of one task; ``baselines``: a paragraph placed above it (the classifier's)."""
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
    p, own = runner.preset, getattr(runner.preset, task)
    return (
        f"# {TITLES[task]}\n\n{baselines}Each cell: {metric} (size on disk of the compressed checkpoint, compression ratio vs the fp32 one)"
        f"{'; with several seeds, their mean (then each seed)' if len(seeds) > 1 else ''}. "
        f"Every number is a real `fairseq-eval-lm`/`fairseq-generate`/`fairseq-validate` run on that checkpoint.\n\n" + "\n".join(lines) +
        f"\n\nTraining modes:\n{legend(runner, task, modes)}\n\nColumns: fp32 = dense inference checkpoint (`quant-noise unpack`); int8/int4 = every "
        f"Linear/Embedding weight as int codes with per-row scales, rest fp16 (`quant-noise pack --scalar-bits`); w8a8 = int8 "
        f"weights (symmetric) and int8 inputs of every Linear, calibrated on training batches (`--scalar-bits 8 --activation-bits 8 "
        f"--calibrate DATA --calibration-batches 32 --observer mse`), computed on int8 kernels; iPQ columns = "
        f"`--task ipq_*` with the schedule ({schedules_text(runner, task, columns)}), packed; +int8 = the same, centroids and remaining layers int8; "
        f"+w8a8 = the same with int8 activations.\n\n"
        f"Preset `{runner.preset_name}`: arch `{' '.join(own.arch)}`, {own.updates} training updates"
        f"{f' (after {own.pretrain_updates} masked-LM pretraining updates on the KJV LM data, without noise, shared by the rows)' if task == 'cls' else ''}, "
        f"--max-tokens {p.max_tokens}, seeds {', '.join(map(str, seeds))}.\n\nCells computed by:\n{provenance(c for rs in cells.values() for c in rs)}\n\n"
        + command_line(command)
    )


def cls_baselines_text(result: dict) -> str:
    """What the classifier's accuracy means (benchmarks/cls_baselines.py computes it)."""
    return (f"Baselines on the same test split: majority class {result['test']['majority']:.1f}%, bag-of-words logistic regression "
            f"{result['test']['bow']:.1f}% (valid: {result['valid']['majority']:.1f}%, {result['valid']['bow']:.1f}%; binary word "
            f"features of each verse and of their overlap, trained on the training pairs).\n\n")
