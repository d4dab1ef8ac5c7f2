"""The heterogeneity report every run writes: label counts per hospital (a table and a
heatmap), hospital sizes, and one index.

It is built from what hospitals report (their training label counts, which are
aggregates), so a real deployment writes the same report as a simulation.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fedmed.run.directory import RunDirectory


def index(label_counts: np.ndarray) -> float:
    """Mean Jensen-Shannon distance (base 2, 0..1) between each hospital's label
    distribution and the whole federation's: 0 when every hospital looks alike."""
    from scipy.spatial.distance import jensenshannon

    total = label_counts.sum(axis=0)
    rows = [row for row in label_counts if row.sum() > 0]
    if not rows or total.sum() == 0:
        return 0.0
    return float(np.mean([jensenshannon(row / row.sum(), total / total.sum(), base=2) for row in rows]))


def report(label_counts: dict[str, list[int]], classes: tuple[str, ...]) -> dict[str, Any]:
    sites = sorted(label_counts)
    table = np.asarray([label_counts[s] for s in sites], dtype=np.int64).reshape(len(sites), len(classes))
    return {
        "classes": list(classes),
        "hospitals": sites,
        "label_counts": table.tolist(),
        "sizes": table.sum(axis=1).tolist(),
        "index": round(index(table), 4),
        "index_name": "mean Jensen-Shannon distance (base 2) of hospital label distributions to the federation's",
    }


def write(out: RunDirectory, rep: dict[str, Any], heatmap: bool = True) -> None:
    """The report and (`heatmap`) its heatmap, which takes a second or two to draw."""
    out.write_heterogeneity(rep, heatmap_png(rep) if heatmap else None)


LABELLED_ROWS = 60  # beyond this many hospitals the heatmap drops its row names and figures (and stays a readable size)
TABLE_ROWS = 30  # the terminal's table shows this many hospitals, then a count of the rest


def heatmap_png(rep: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(rep["label_counts"])
    rows = len(rep["hospitals"])
    labelled = rows <= LABELLED_ROWS
    fig, (ax, bars) = plt.subplots(
        1, 2, figsize=(2.2 + 1.1 * len(rep["classes"]) + 2.5, 1.2 + 0.35 * min(rows, LABELLED_ROWS)),
        gridspec_kw={"width_ratios": [len(rep["classes"]), 2]}, sharey=True,
    )
    ax.imshow(counts, cmap="Blues", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(rep["classes"])), rep["classes"], rotation=30, ha="right")
    if labelled:
        ax.set_yticks(range(rows), rep["hospitals"])
        top = counts.max() if counts.size else 0
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > 0.6 * top else "black")
    else:
        ax.set_ylabel(f"{rows} hospitals, in name order")
    ax.set_title("training images per class")
    bars.barh(range(len(rep["hospitals"])), rep["sizes"], color="#4a7ab5")
    bars.set_title("hospital size")
    fig.suptitle(f"heterogeneity index {rep['index']:.3f} (mean JS distance to the federation)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def print_table(console: Console, rep: dict[str, Any]) -> None:
    table = Table(title=f"training images per hospital and class · heterogeneity index {rep['index']:.3f}")
    table.add_column("hospital")
    for name in rep["classes"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    rows = list(zip(rep["hospitals"], rep["label_counts"], rep["sizes"], strict=True))
    for site, row, size in rows[:TABLE_ROWS]:
        table.add_row(site, *map(str, row), str(size))
    if len(rows) > TABLE_ROWS:
        table.add_row(f"... {len(rows) - TABLE_ROWS} more", *[""] * (len(rep["classes"]) + 1))
    console.print(table)
