"""The ablation table (results/ablation_noise.md): every lever, valid (to choose) and test (to report)
for each seed, and iPQ's cost against the equal-budget dense control."""
from __future__ import annotations

import statistics
from typing import List

from .metrics import metric_of
from .runs import Runner
from .provenance import portable
from .tables import command_line, group, legend, provenance, seeds_text


def render_ablation(results: List[dict], task: str, modes: List[str], columns: List[str], runner: Runner, seeds: List[int],
                    command: str) -> str:
    cells = group(results, task)
    better = "lower" if task == "lm" else "higher"  # perplexity; BLEU and accuracy
    control = "none_long" if "none_long" in modes else None
    schedules = getattr(runner.preset, task).schedules
    ipq_updates = runner.ipq_updates(task)  # the schedule's, read once
    with_ipq = any(c.partition("+")[0] in schedules for c in columns)
    out = []
    for subset in ("valid", "test"):
        metric = metric_of(task, subset)
        compared = [c for c in columns if c != "fp32"] if control else []
        head = "| mode | updates (train + iPQ) | seeds | " + " | ".join(columns) + "".join(f" | {c} vs dense control" for c in compared) + " |"
        lines = [head, "|---|---:|---:|" + "---:|" * (len(columns) + len(compared))]
        ref = [r[metric] for r in cells.get((control, "fp32"), [])] if control else []
        for m in modes:
            ran = sorted({r["seed"] for c in columns for r in cells.get((m, c), [])})
            row = [f"| {m} | {runner.total_budget(task, m)}{f' + {ipq_updates}' if with_ipq else ''} | {', '.join(map(str, ran)) or '–'} |"]
            equal_budget = control and runner.total_budget(task, m) + ipq_updates == runner.total_budget(task, control)
            for c in columns:
                rs = cells.get((m, c))
                row.append(f" {seeds_text([r[metric] for r in rs])} |" if rs else " – |")
            for c in compared:
                rs = cells.get((m, c))
                if not rs or not ref or not equal_budget:
                    row.append(" – |")
                    continue
                mean, base = statistics.mean(r[metric] for r in rs), statistics.mean(ref)
                row.append(f" {100 * (mean / base - 1):+.1f}% |" if task == "lm" else f" {mean - base:+.2f} |")
            lines.append("".join(row))
        out.append(f"### {'Valid' if subset == 'valid' else 'Test'} split ({metric}, {better} is better)\n\n" + "\n".join(lines))
    p = runner.preset
    return (
        f"## {'Language model (KJV)' if task == 'lm' else 'Translation (KJV -> RV1909)'}, preset `{runner.preset_name}`, seeds {', '.join(map(str, seeds))}\n\n"
        f"Each cell: the mean over seeds (then each seed). Choose on valid, report test. "
        f"`vs dense control`: the mean against `{control}`'s fp32 model, trained without noise for as many updates as training + iPQ "
        f"(shown for the rows of that total budget only; rows trained longer compare with `{control}`'s own iPQ columns).\n\n"
        + "\n\n".join(out) +
        f"\n\nModes:\n{legend(runner, task, modes)}\n\nColumns: fp32 = the dense model; "
        + ", ".join(f"{c} = `{portable([runner.schedule(task, c)])}`" for c in schedules if c in columns) +
        f" (packed, bytes on disk as in the main tables).\n\nArch `{' '.join(getattr(p, task).arch)}`, --max-tokens {p.max_tokens}.\n\n"
        f"Cells computed by:\n{provenance(c for rs in cells.values() for c in rs)}\n\n" + command_line(command)
    )
