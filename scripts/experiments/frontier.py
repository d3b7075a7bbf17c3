"""The LM's size/quality frontier (results/frontier_lm.md, .png, .json): test perplexity against bytes
on disk, one line per training recipe, one panel per preset.

A record is the issue's flat shape: {"preset", "recipe", "point", "ratio", "bytes", "seed",
"valid_ppl", "test_ppl"} (recipe: the grid's row, `none` for no noise, `qat_int4` for QAT; point: the
compression column; ratio: the recipe's own fp32 file over this file). Each run of the grid refreshes
the records it computed and keeps the others, so panels and rows computed at different times (or on
different machines) live in one file. Pure text and a plot; nothing here runs fairseq.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

from .grid import Grid
from .tables import command_line

FIELDS = ("preset", "recipe", "point", "ratio", "bytes", "seed", "valid_ppl", "test_ppl")
PROVENANCE = ("command", "commit", "device")  # kept beside the fields: what computed the record
NO_NOISE, QAT = ("none", "none_long"), ("qat_int4", "qat_int4_long")  # the baselines, at the grid's two budgets
BASELINES = NO_NOISE + QAT  # a noise recipe must beat a no-noise one and a QAT one at the same point


def frontier_records(results: List[dict], preset: str) -> List[dict]:
    """The grid's LM cells of one preset as frontier records (ratio against the same recipe and seed's fp32)."""
    lm = [r for r in results if r["task"] == "lm"]
    fp32 = {(r["mode"], r.get("seed", 1)): r["bytes"] for r in lm if r["column"] == "fp32"}  # old records: no seed, seed 1
    out = []
    for r in lm:
        dense = fp32.get((r["mode"], r.get("seed", 1)))
        out.append({"preset": preset, "recipe": r["mode"], "point": r["column"],
                    "ratio": round(dense / r["bytes"], 2) if dense else None, "bytes": r["bytes"], "seed": r.get("seed", 1),
                    "valid_ppl": r.get("valid_ppl"), "test_ppl": r["ppl"], **{k: r[k] for k in PROVENANCE if k in r}})
    return out


def _identity(record: dict) -> tuple:
    return record["preset"], record["recipe"], record["point"], record["seed"]


def merged(old: List[dict], new: List[dict]) -> List[dict]:
    """``new`` replaces the records of ``old`` with its identities (preset, recipe, point, seed) and keeps
    the rest, so experiments with other rows or columns of one preset add up; records in a stable order."""
    fresh = {_identity(r) for r in new}
    keep = [r for r in old if _identity(r) not in fresh]
    return sorted(keep + new, key=lambda r: (r["preset"], r["recipe"], -r["bytes"], r["point"], r["seed"]))


def as_cell(record: dict) -> dict:
    """A frontier record read back as a grid cell (``--render-only`` from results/frontier_lm.json)."""
    return {"task": "lm", "mode": record["recipe"], "column": record["point"], "seed": record["seed"], "bytes": record["bytes"],
            "ppl": record["test_ppl"], "valid_ppl": record["valid_ppl"], "preset": record["preset"],
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


def _cell(rs: List[dict]) -> str:
    test = [r["test_ppl"] for r in rs]
    seeds = "" if len(rs) == 1 else f" ({' / '.join(f'{v:.2f}' for v in test)})"
    valid = _mean(rs, "valid_ppl")
    return f"{statistics.mean(test):.2f}{seeds}" + (f" [valid {valid:.2f}]" if valid is not None else "")


def verdict(recipes: Dict[str, List[dict]]) -> str:
    """Which recipe this point chooses on valid (mean over seeds), and whether a noise recipe beats both
    baselines on test with every seed (each of its seeds below the best baseline seed)."""
    valid = {name: _mean(rs, "valid_ppl") for name, rs in recipes.items()}
    chosen = min((n for n, v in valid.items() if v is not None), key=lambda n: valid[n], default=None)
    base = [r["test_ppl"] for name in BASELINES for r in recipes.get(name, [])]
    if not all(any(name in recipes for name in kind) for kind in (NO_NOISE, QAT)):
        beat = "a baseline is missing"
    else:
        winners = [name for name, rs in recipes.items() if name not in BASELINES and len(rs) >= 2
                   and max(r["test_ppl"] for r in rs) < min(base)]
        beat = f"noise wins: {', '.join(winners)}" if winners else "no noise recipe beats both baselines on every seed"
    return f"chosen on valid: {chosen or '-'}; {beat}"


def render_panel(records: List[dict], preset: str, doc: str) -> str:
    rs = [r for r in records if r["preset"] == preset]
    recipes = sorted({r["recipe"] for r in rs}, key=lambda n: (n not in BASELINES, BASELINES.index(n) if n in BASELINES else 0, n))
    points = _by_point(rs)
    order = sorted(points, key=lambda p: -statistics.mean(r["bytes"] for rr in points[p].values() for r in rr))
    lines = [f"## Preset `{preset}`: {doc}", "",
             "Test ppl: mean over seeds (each seed) [mean valid ppl]; size: mean bytes on disk, ratio to fp32.", "",
             "| point | size | ratio | " + " | ".join(f"`{n}`" for n in recipes) + " | reading |",
             "|---|---:|---:|" + "---|" * len(recipes) + "---|"]
    for point in order:
        by = points[point]
        every = [r for rr in by.values() for r in rr]
        ratios = [r["ratio"] for r in every if r["ratio"]]
        ratio = f"x{statistics.mean(ratios):.1f}" if ratios else "-"
        size = f"{statistics.mean(r['bytes'] for r in every) / 1e6:.3f} MB"
        cells = [(_cell(by[n]) if n in by else "-") for n in recipes]
        lines.append(f"| {point} | {size} | {ratio} | " + " | ".join(cells) + f" | {verdict(by)} |")
    return "\n".join(lines)


def render_frontier(records: List[dict], grid: Grid, command: str) -> str:
    """The whole file: a panel per preset, what each recipe and point is, and what computed each record."""
    presets = panels(records)
    parts = ["# The LM's size/quality frontier: does training with Quant-Noise pay once the model is compressed?", "",
             "One panel per preset; rows are compression points, columns training recipes (`none`: no noise, `qat_int4`: QAT). "
             "The plot is `frontier_lm.png`, the records `frontier_lm.json`. A noise recipe wins a point when each of its "
             "seeds has a lower test ppl than every seed of both baselines there.", ""]
    for preset in presets:
        spec = grid.presets.get(preset)
        parts += [render_panel(records, preset, spec.doc if spec else "(not in presets.yaml)"), ""]
        if spec:
            parts.append(f"Model and budget: `{' '.join(spec.lm.arch)}`, {spec.lm.updates} updates, lr scheduler "
                         f"{spec.lm.lr_scheduler}{', checkpoint_best on valid' if spec.lm.keep_best else ''}, --max-tokens {spec.max_tokens}; "
                         "schedules: " + ", ".join(f"{c} = `{path}`" for c, path in spec.lm.schedules.items()) + ".")
        runs: Dict[str, set] = {}
        for r in records:
            if r["preset"] == preset:
                runs.setdefault(f"{r.get('device', 'not recorded')}, commit {r.get('commit', 'not recorded')}: "
                                f"`{r.get('command', 'not recorded')}`", set()).add(r["recipe"])
        parts += ["", "Records computed by:"] + [f"- {where} ({', '.join(sorted(m))})" for where, m in runs.items()] + [""]
    recipes = sorted({r["recipe"] for r in records})
    parts += ["Recipes:"] + [f"- `{n}`: {grid.tasks['lm'].modes[n].doc}: `{' '.join(grid.tasks['lm'].modes[n].flags) or '(no flags)'}`"
                             for n in recipes if n in grid.tasks["lm"].modes]
    parts += ["", "Points: fp32 = `quant-noise unpack`; int8/int4/int3/int2 = `quant-noise pack --scalar-bits N` (per row; "
              "int4_tensor: one scale per weight, the paper's scalar baseline); schedule columns = the iPQ task with that schedule, packed.",
              "", command_line(command)]
    return "\n".join(parts)


def plot_frontier(records: List[dict], out) -> None:
    """One panel per preset: mean test ppl against mean bytes (log), seeds as error bars; each recipe's line joins
    its frontier (the points no smaller point of the recipe beats), the others are hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .plot import save_png

    presets = panels(records)
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rs = [r for r in records if r["preset"] == preset]
        for recipe in sorted({r["recipe"] for r in rs}):
            pts = []
            for point, by in _by_point([r for r in rs if r["recipe"] == recipe]).items():
                test = [r["test_ppl"] for r in by[recipe]]
                pts.append((statistics.mean(r["bytes"] for r in by[recipe]) / 1e6, statistics.mean(test), min(test), max(test)))
            pts.sort()
            front = [p for p in pts if not any(q[0] <= p[0] and q[1] < p[1] for q in pts)]  # none smaller and better
            other = [p for p in pts if p not in front]
            style = {"color": "black"} if recipe in NO_NOISE else {"color": "grey", "linestyle": "--"} if recipe in QAT else {}
            line = ax.errorbar([p[0] for p in front], [p[1] for p in front], yerr=[[p[1] - p[2] for p in front], [p[3] - p[1] for p in front]],
                               marker="o", ms=4, capsize=3, label=recipe, **style)
            if other:  # points beaten by a smaller one of the same recipe: shown, not joined
                ax.plot([p[0] for p in other], [p[1] for p in other], linestyle="none", marker="o", ms=5, mfc="none",
                        color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel("test perplexity (log scale; bars: seeds)")
        ax.set_title(f"KJV LM, preset {preset}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, out)
