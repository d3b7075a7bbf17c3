"""results/size_vs_quality.png: each task's metric against size on disk (log scale), a line per row."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import List

from .metrics import metric_of
from .tables import group

YLABELS = {"lm": "test perplexity", "mt": "BLEU", "cls": "test accuracy (%)"}
TITLES = {"lm": "KJV language model", "mt": "KJV -> RV1909 translation", "cls": "KJV verse-pair classifier"}


def plot(results: List[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = [t for t in ("lm", "mt", "cls") if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = metric_of(task)
        cells = group(results, task)
        for mode in sorted({m for m, _ in cells}):
            pts = sorted((rs[0]["bytes"] / 1e6, statistics.mean(r[metric] for r in rs)) for (m, _), rs in cells.items() if m == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: they overlap otherwise
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel(YLABELS[task])
        ax.set_title(TITLES[task])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, out)


def save_png(fig, out: Path) -> None:
    """A figure to ``out`` as PNG, never half-written; the figure is closed."""
    import matplotlib.pyplot as plt

    from quant_noise_plugin.atomic import atomic_file

    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
