"""The size/quality frontiers: the LM's test perplexity (results/frontier_lm.md, .png, .json) and the
encoder's test accuracy (results/frontier_cls.*) against bytes on disk, one line per training recipe,
one panel per preset.

A record is the issue's flat shape: {"preset", "recipe", "point", "ratio", "bytes", "seed",
"valid_ppl", "test_ppl"} (the encoder's: "valid_acc", "test_acc"; recipe: the grid's row, `none` for
no noise, `qat_int4` for QAT; point: the compression column; ratio: the recipe's own fp32 file over
this file). Each run of the grid refreshes the records it computed and keeps the others, so panels and
rows computed at different times (or on different machines) live in one file. Pure text and a plot;
nothing here runs fairseq.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .grid import Grid
from .metrics import METRICS as CELL_METRICS
from .plot import YLABELS
from .tables import command_line



@dataclass(frozen=True)
class Metric:
    """A frontier's quality axis: the grid cell's key ("ppl", "acc") and which way is better."""

    key: str
    label: str
    higher_is_better: bool
    title: str

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def best(self, values):
        return max(values) if self.higher_is_better else min(values)

    def worst(self, values):
        return min(values) if self.higher_is_better else max(values)


METRICS = {"lm": Metric(CELL_METRICS["lm"], YLABELS["lm"], False, "The LM's size/quality frontier"),
           "cls": Metric(CELL_METRICS["cls"], YLABELS["cls"], True, "The encoder's size/quality frontier (verse-pair classifier)")}
FRONTIER_TASKS = tuple(METRICS)
FIELDS = ("preset", "recipe", "point", "ratio", "bytes", "seed", "valid_ppl", "test_ppl")  # the LM's; the encoder's: *_acc
PROVENANCE = ("command", "commit", "device")  # kept beside the fields: what computed the record
# the baselines, with their budgets, dropout, learning rates and finetuned twins: a noise recipe beats them all or none
NO_NOISE = ("none", "none_long", "none_drop0", "none_lr3e-3", "none_lr1e-2", "ft_none")
QAT = ("qat_int4", "qat_int4_long", "qat_int4_drop0")
BASELINES = NO_NOISE + QAT  # a noise recipe must beat a no-noise one and a QAT one at the same point
SMALL = "small_d"  # rows of smaller dense models (small_d<width>[_lr...]): the buy a user would make instead of compressing
SMALL_LINE = "small dense (best at each size)"


def is_small(recipe: str) -> bool:
    return recipe.startswith(SMALL)


def file_name(task: str, suffix: str) -> str:
    return f"frontier_{task}.{suffix}"


def task_of(record: dict) -> str:
    """A stored frontier record's task, from its metric's keys."""
    return next((t for t, m in METRICS.items() if f"test_{m.key}" in record), "lm")


def frontier_records(results: List[dict], preset: str, task: str = "lm") -> List[dict]:
    """The grid's cells of one task and preset as frontier records (ratio against the same recipe and seed's fp32)."""
    key = METRICS[task].key
    cells = [r for r in results if r["task"] == task]
    fp32 = {(r["mode"], r.get("seed", 1)): r["bytes"] for r in cells if r["column"] == "fp32"}  # old records: no seed, seed 1
    out = []
    for r in cells:
        dense = fp32.get((r["mode"], r.get("seed", 1)))
        out.append({"preset": preset, "recipe": r["mode"], "point": r["column"],
                    "ratio": round(dense / r["bytes"], 2) if dense else None, "bytes": r["bytes"], "seed": r.get("seed", 1),
                    f"valid_{key}": r.get(f"valid_{key}"), f"test_{key}": r[key], **{k: r[k] for k in PROVENANCE if k in r}})
    return out


def _identity(record: dict) -> tuple:
    return record["preset"], record["recipe"], record["point"], record["seed"]


def _scores(record: dict) -> tuple:
    """What a record measured (its valid and test metrics): an fp32 record that scores otherwise is another model."""
    return tuple(sorted((k, v) for k, v in record.items() if k.startswith(("valid_", "test_"))))


def merged(old: List[dict], new: List[dict]) -> List[dict]:
    """``new`` replaces the records of ``old`` with its identities (preset, recipe, point, seed) and keeps
    the rest, so experiments with other rows or columns of one preset add up; records in a stable order.
    A row retrained (its fp32 record in ``new`` scores otherwise than the stored one: code or recipe changed) makes
    the stored points of that row and seed stale: they were compressed from the earlier model, and are dropped."""
    fresh = {_identity(r) for r in new}
    stored_fp32 = {(r["preset"], r["recipe"], r["seed"]): r for r in old if r["point"] == "fp32"}
    retrained = {key for r in new if r["point"] == "fp32" and (key := (r["preset"], r["recipe"], r["seed"])) in stored_fp32
                 and _scores(stored_fp32[key]) != _scores(r)}
    keep = [r for r in old if _identity(r) not in fresh and (r["preset"], r["recipe"], r["seed"]) not in retrained]
    every = keep + new
    fp32 = {(r["preset"], r["recipe"], r["seed"]): r["bytes"] for r in every if r["point"] == "fp32"}
    every = [dict(r, ratio=round(fp32[key] / r["bytes"], 2)) if r.get("ratio") is None and (key := (r["preset"], r["recipe"], r["seed"])) in fp32
             else r for r in every]  # a point computed without its fp32 in the same run: the stored fp32's ratio
    return sorted(every, key=lambda r: (r["preset"], r["recipe"], -r["bytes"], r["point"], r["seed"]))


def as_cell(record: dict) -> dict:
    """A frontier record read back as a grid cell (``--render-only`` from results/frontier_*.json)."""
    task = task_of(record)
    key = METRICS[task].key
    return {"task": task, "mode": record["recipe"], "column": record["point"], "seed": record["seed"], "bytes": record["bytes"],
            key: record[f"test_{key}"], f"valid_{key}": record[f"valid_{key}"], "preset": record["preset"],
            **{k: record[k] for k in PROVENANCE if k in record}}


def means_at(records: List[dict], preset: str, point: str) -> Dict[str, Tuple[float, int]]:
    """Each recipe's mean test ppl (and its number of seeds) at one point of one panel: what the demo compares to."""
    by = _by_point([r for r in records if r["preset"] == preset]).get(point, {})
    return {name: (statistics.mean(r["test_ppl"] for r in rs), len(rs)) for name, rs in by.items()}


def panels(records: List[dict]) -> List[str]:
    """The presets of ``records``, in the order the file and the plot show them (the quick panel last)."""
    return sorted({r["preset"] for r in records}, key=lambda p: (p == "quick", p))


def _by_point(records: List[dict]) -> Dict[str, Dict[str, List[dict]]]:
    points: Dict[str, Dict[str, List[dict]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        points.setdefault(r["point"], {}).setdefault(r["recipe"], []).append(r)
    return points


def _mean(rs: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _cell(rs: List[dict], metric: Metric) -> str:
    test = [r[f"test_{metric.key}"] for r in rs]
    seeds = "" if len(rs) == 1 else f" ({' / '.join(f'{v:.2f}' for v in test)})"
    valid = _mean(rs, f"valid_{metric.key}")
    return f"{statistics.mean(test):.2f}{seeds}" + (f" [valid {valid:.2f}]" if valid is not None else "")


def verdict(recipes: Dict[str, List[dict]], metric: Metric = METRICS["lm"]) -> str:
    """Which recipe this point chooses on valid (mean over seeds), and whether a noise recipe beats both
    baselines on test with every seed (its worst seed better than the best baseline seed)."""
    test, valid_key = f"test_{metric.key}", f"valid_{metric.key}"
    valid = {name: _mean(rs, valid_key) for name, rs in recipes.items()}
    pick = max if metric.higher_is_better else min
    chosen = pick((n for n, v in valid.items() if v is not None), key=lambda n: valid[n], default=None)
    base = [r[test] for name in BASELINES for r in recipes.get(name, [])]
    judged = {name: rs for name, rs in recipes.items() if name not in BASELINES and len(rs) >= 2}  # one seed is a screen
    if not all(any(name in recipes for name in kind) for kind in (NO_NOISE, QAT)):
        beat = "a baseline is missing"
    elif not judged:
        beat = "noise rows on one seed: a screen, no verdict"
    else:
        winners = [name for name, rs in judged.items() if metric.better(metric.worst(r[test] for r in rs), metric.best(base))]
        beat = f"noise wins: {', '.join(winners)}" if winners else "no noise recipe beats both baselines on every seed"
    return f"chosen on valid: {chosen or '-'}; {beat}"


def render_panel(records: List[dict], preset: str, doc: str, metric: Metric = METRICS["lm"]) -> str:
    small = [r for r in records if r["preset"] == preset and is_small(r["recipe"])]
    rs = [r for r in records if r["preset"] == preset and not is_small(r["recipe"])]
    recipes = sorted({r["recipe"] for r in rs}, key=lambda n: (n not in BASELINES, BASELINES.index(n) if n in BASELINES else 0, n))
    points = _by_point(rs)
    order = sorted(points, key=lambda p: -statistics.mean(r["bytes"] for rr in points[p].values() for r in rr))
    lines = [f"## Preset `{preset}`: {doc}", "",
             f"Test {metric.key}: mean over seeds (each seed) [mean valid {metric.key}]; size: mean bytes on disk, ratio to fp32.", "",
             "| point | size | ratio | " + " | ".join(f"`{n}`" for n in recipes) + " | reading |",
             "|---|---:|---:|" + "---|" * len(recipes) + "---|"]
    dense = [r["bytes"] for rr in points.get("fp32", {}).values() for r in rr]
    for point in order:
        by = points[point]
        every = [r for rr in by.values() for r in rr]
        ratios = [r["ratio"] for r in every if r["ratio"]]
        if not ratios and dense:  # recipes that share another's training (distillation in iPQ only): the panel's fp32
            ratios = [statistics.mean(dense) / r["bytes"] for r in every]
        ratio = f"x{statistics.mean(ratios):.1f}" if ratios else "-"
        size = f"{statistics.mean(r['bytes'] for r in every) / 1e6:.3f} MB"
        cells = [(_cell(by[n], metric) if n in by else "-") for n in recipes]
        lines.append(f"| {point} | {size} | {ratio} | " + " | ".join(cells) + f" | {verdict(by, metric)} |")
    if small:
        lines += ["", render_small(small, rs, metric)]
    return "\n".join(lines)


def _small_points(small: List[dict], metric: Metric) -> List[dict]:
    """Each small model's points (width, learning rate, packing), means over seeds: the candidates of the small line."""
    out = []
    for point, by in _by_point(small).items():
        for recipe, rs in by.items():
            out.append({"recipe": recipe, "point": point, "bytes": statistics.mean(r["bytes"] for r in rs), "rs": rs,
                        "valid": _mean(rs, f"valid_{metric.key}"), "test": statistics.mean(r[f"test_{metric.key}"] for r in rs)})
    return sorted(out, key=lambda p: -p["bytes"])


def _chosen_small(candidates: List[dict], metric: Metric) -> Optional[dict]:
    """The small point chosen on valid (mean over seeds) among ``candidates``."""
    judged = [c for c in candidates if c["valid"] is not None]
    return (max if metric.higher_is_better else min)(judged, key=lambda c: c["valid"], default=None)


def render_small(small: List[dict], rest: List[dict], metric: Metric) -> str:
    """The small dense models' points, then, at each point of the panel, the best of them at no more bytes."""
    points = _small_points(small, metric)
    lines = [f"Small dense models, the buy a user would make instead of compressing (rows `{SMALL}<width>[_lr...]`; test {metric.key}, "
             "mean (seeds) [valid]):", "", "| small model | point | size | test |", "|---|---|---:|---|"]
    lines += [f"| `{p['recipe']}` | {p['point']} | {p['bytes'] / 1e6:.3f} MB | {_cell(p['rs'], metric)} |" for p in points]
    lines += ["", f"Compress, or train small? At each point of the panel, the recipe chosen there on valid against the small point chosen "
              "on valid among those of no more bytes:", "", "| point | size | compressed (chosen on valid) | small, at no more bytes | reading |",
              "|---|---:|---|---|---|"]
    by_point = _by_point(rest)
    for point in sorted(by_point, key=lambda p: -statistics.mean(r["bytes"] for rr in by_point[p].values() for r in rr)):
        recipes = by_point[point]
        valid = {n: _mean(rs, f"valid_{metric.key}") for n, rs in recipes.items()}
        valid = {n: v for n, v in valid.items() if v is not None}
        if not valid:
            continue
        name = (max if metric.higher_is_better else min)(valid, key=valid.get)
        size = statistics.mean(r["bytes"] for r in recipes[name])
        big = statistics.mean(r[f"test_{metric.key}"] for r in recipes[name])
        pick = _chosen_small([p for p in points if p["bytes"] <= size], metric)
        if pick is None:
            lines.append(f"| {point} | {size / 1e6:.3f} MB | `{name}` {big:.2f} | none this small | - |")
            continue
        winner = "compressed" if metric.better(big, pick["test"]) else "small model"
        lines.append(f"| {point} | {size / 1e6:.3f} MB | `{name}` {big:.2f} | `{pick['recipe']}` {pick['point']} "
                     f"({pick['bytes'] / 1e6:.3f} MB) {pick['test']:.2f} | {winner} better |")
    return "\n".join(lines)


def render_frontier(records: List[dict], grid: Grid, command: str, task: str = "lm", preamble: str = "") -> str:
    """The whole file: a panel per preset, what each recipe and point is, and what computed each record
    (``preamble``: what the numbers mean, e.g. the classifier's baselines, under the title)."""
    metric = METRICS[task]
    presets = panels(records)
    parts = [f"# {metric.title}: does training with Quant-Noise pay once the model is compressed?", "",
             *([preamble.rstrip(), ""] if preamble else []),
             "One panel per preset; rows are compression points, columns training recipes (`none`: no noise, `qat_int4`: QAT). "
             f"The plot is `{file_name(task, 'png')}`, the records `{file_name(task, 'json')}`. A noise recipe wins a point when each of its "
             f"seeds has a {'higher' if metric.higher_is_better else 'lower'} test {metric.key} than every seed of both baselines there.", ""]
    for preset in presets:
        spec = grid.presets.get(preset)
        doc = (getattr(spec, task).doc or spec.doc) if spec else "(not in presets.yaml)"
        parts += [render_panel(records, preset, doc, metric), ""]
        if spec:
            own = getattr(spec, task)
            pretrain = f" after {own.pretrain_updates} masked-LM pretraining updates on the KJV LM data (no noise, shared by the rows)" if own.pretrain_updates else ""
            best = grid.tasks[task].best
            chosen_on = best[best.index("--best-checkpoint-metric") + 1] if "--best-checkpoint-metric" in best else "loss"
            parts.append(f"Model and budget: `{' '.join(own.arch)}`, {own.updates} updates{pretrain}, lr scheduler "
                         f"{own.lr_scheduler}{f', checkpoint_best on valid {chosen_on}' if own.keep_best else ''}, --max-tokens {spec.max_tokens}; "
                         "schedules: " + ", ".join(f"{c} = `{path}`" for c, path in own.schedules.items()) + ".")
        runs: Dict[str, set] = {}
        for r in records:
            if r["preset"] == preset:
                runs.setdefault(f"{r.get('device', 'not recorded')}, commit {r.get('commit', 'not recorded')}: "
                                f"`{r.get('command', 'not recorded')}`", set()).add(r["recipe"])
        parts += ["", "Records computed by:"] + [f"- {where} ({', '.join(sorted(m))})" for where, m in runs.items()] + [""]
    recipes = sorted({r["recipe"] for r in records})
    modes = grid.tasks[task].modes
    parts += ["Recipes:"] + [f"- `{n}`: {modes[n].doc}: `{' '.join(modes[n].flags) or '(no flags)'}`" for n in recipes if n in modes]
    parts += ["", "Points: fp32 = `quant-noise unpack`; int8/int4/int3/int2 = `quant-noise pack --scalar-bits N` (per row; "
              "int4_tensor: one scale per weight, the paper's scalar baseline); schedule columns = the iPQ task with that schedule, packed.",
              "", command_line(command)]
    return "\n".join(parts)


def plot_frontier(records: List[dict], out, task: str = "lm") -> None:
    """One panel per preset: mean test metric against mean bytes (log), seeds as error bars; each recipe's line joins
    its frontier (the points no smaller point of the recipe beats), the others are hollow markers."""
    metric = METRICS[task]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .plot import save_png

    presets = panels(records)
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rs = [r for r in records if r["preset"] == preset]
        lines = sorted({r["recipe"] for r in rs if not is_small(r["recipe"])}) + ([SMALL_LINE] if any(is_small(r["recipe"]) for r in rs) else [])
        for recipe in lines:
            pts = []
            members = [r for r in rs if (is_small(r["recipe"]) if recipe == SMALL_LINE else r["recipe"] == recipe)]
            for point, by in _by_point(members).items():
                for rows in by.values():  # the small line: every width and learning rate, its front keeps the best
                    test = [r[f"test_{metric.key}"] for r in rows]
                    pts.append((statistics.mean(r["bytes"] for r in rows) / 1e6, statistics.mean(test), min(test), max(test)))
            pts.sort()
            front = [p for p in pts if not any(q[0] <= p[0] and metric.better(q[1], p[1]) for q in pts)]  # none smaller and better
            other = [p for p in pts if p not in front]
            style = {"color": "black"} if recipe in NO_NOISE else {"color": "grey", "linestyle": "--"} if recipe in QAT else {}
            if recipe == SMALL_LINE:
                style = {"color": "tab:green", "linestyle": "-."}
            if recipe.endswith("_drop0"):  # the same recipe without dropout: its colour family, dotted
                style["linestyle"] = ":"
            line = ax.errorbar([p[0] for p in front], [p[1] for p in front], yerr=[[p[1] - p[2] for p in front], [p[3] - p[1] for p in front]],
                               marker="o", ms=4, capsize=3, label=recipe, **style)
            if other and recipe != SMALL_LINE:  # points beaten by a smaller one of the same recipe: shown, not joined
                ax.plot([p[0] for p in other], [p[1] for p in other], linestyle="none", marker="o", ms=5, mfc="none",
                        color=line[0].get_color())
        ax.set_xscale("log")
        if not metric.higher_is_better:  # perplexities span decades; accuracies do not
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel(f"{metric.label} ({'' if metric.higher_is_better else 'log scale; '}bars: seeds)")
        ax.set_title(f"KJV {'LM' if task == 'lm' else 'verse-pair classifier'}, preset {preset}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, out)
