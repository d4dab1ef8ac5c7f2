"""The heterogeneity report every run writes: label counts per hospital (a table and
a heatmap), hospital sizes, and one index.

It is built from what hospitals report (their training label counts, which are
aggregates), so a real deployment writes the same report as a simulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedmed.data.skew import heterogeneity

JSON_NAME, PNG_NAME = "heterogeneity.json", "heterogeneity.png"


def report(label_counts: dict[str, list[int]], classes: tuple[str, ...]) -> dict:
    sites = sorted(label_counts)
    table = np.asarray([label_counts[s] for s in sites], dtype=np.int64).reshape(len(sites), len(classes))
    return {
        "classes": list(classes),
        "hospitals": sites,
        "label_counts": table.tolist(),
        "sizes": table.sum(axis=1).tolist(),
        "index": round(heterogeneity(table), 4),
        "index_name": "mean Jensen-Shannon distance (base 2) of hospital label distributions to the federation's",
    }


def write(run_dir: Path, rep: dict) -> None:
    (run_dir / JSON_NAME).write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    heatmap(rep).savefig(run_dir / PNG_NAME, dpi=120, bbox_inches="tight")


def heatmap(rep: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(rep["label_counts"])
    fig, (ax, bars) = plt.subplots(
        1, 2, figsize=(2.2 + 1.1 * len(rep["classes"]) + 2.5, 1.2 + 0.35 * len(rep["hospitals"])),
        gridspec_kw={"width_ratios": [len(rep["classes"]), 2]}, sharey=True,
    )
    ax.imshow(counts, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(rep["classes"])), rep["classes"], rotation=30, ha="right")
    ax.set_yticks(range(len(rep["hospitals"])), rep["hospitals"])
    top = counts.max() if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > 0.6 * top else "black")
    ax.set_title("training images per class")
    bars.barh(range(len(rep["hospitals"])), rep["sizes"], color="#4a7ab5")
    bars.set_title("hospital size")
    fig.suptitle(f"heterogeneity index {rep['index']:.3f} (mean JS distance to the federation)", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def print_table(console: Console, rep: dict) -> None:
    table = Table(title=f"training images per hospital and class · heterogeneity index {rep['index']:.3f}")
    table.add_column("hospital")
    for name in rep["classes"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for site, row, size in zip(rep["hospitals"], rep["label_counts"], rep["sizes"]):
        table.add_row(site, *map(str, row), str(size))
    console.print(table)
