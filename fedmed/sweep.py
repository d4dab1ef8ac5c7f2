"""`fedmed sweep STUDY.toml`: a grid of runs (variants x grid x seeds), resumable, with
a results table, mean +- std per cell and plots.

A study file is a fedmed config (the settings every cell shares) plus a [sweep]
table:

    [sweep]
    seeds = [0, 1, 2]
    variants = [{"skew.labels" = "dirichlet", "skew.beta" = 0.3}, ...]   # optional
    [sweep.grid]
    "federation.strategy" = ["fedavg", "fedprox"]

Each cell runs as its own `fedmed simulate` process (so Ray starts clean) into
OUT/cells/<cell>/; a cell whose directory holds a summary is skipped on a re-run.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmed import config as config_mod
from fedmed.errors import FedmedError
from fedmed.run.directory import RunDirectory, atomic_write

Scalar = bool | int | float | str


# Settings a study sets itself for every cell: a grid or a variant cannot vary them.
RESERVED = {"seed": "list the seeds in sweep.seeds", "output.dir": "pass --out", "output.name": "each cell is named after its settings"}


class SweepSpec(BaseModel):
    """The [sweep] table of a study file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    seeds: list[int] = Field([0], min_length=1, description="Seeds each cell runs with.")
    variants: list[dict[str, Scalar]] = Field([{}], min_length=1, description="Alternative sets of settings, each crossed with the grid.")
    grid: dict[str, list[Scalar]] = Field({}, description="Settings to cross: key -> values.")
    series: str = Field("", description="Setting that draws one line per value in the plots (default: the first grid key).")
    metric: Literal["accuracy", "hospital_test_accuracy"] = Field(
        "accuracy", description="What the final-accuracy plot shows: the global test set's, or the hospitals' own test sets'."
    )

    @model_validator(mode="after")
    def _varies_what_it_can(self) -> SweepSpec:
        for key in [*self.grid, *(k for variant in self.variants for k in variant)]:
            if key in RESERVED:
                raise ValueError(f"{key} cannot be varied by a grid or a variant: {RESERVED[key]}")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep.grid.{key} is an empty list: give it at least one value")
        return self


@dataclass(frozen=True)
class Cell:
    settings: dict[str, Scalar]  # what differs from the study's base config, seed excluded
    seed: int

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.settings.items()) or "base"

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:8]
        return f"{digest}-seed{self.seed}"


def load_study(path: Path) -> tuple[dict[str, Any], SweepSpec]:
    """(flat base settings, sweep spec); every cell's config is validated up front."""
    if not path.is_file():
        raise FedmedError(f"study file not found: {path}")
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedmedError(f"study file {path} is not valid TOML: {exc}") from None
    try:
        spec = SweepSpec.model_validate(tree.pop("sweep", {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = f"`sweep.{'.'.join(map(str, err['loc']))}`: " if err["loc"] else ""
        raise FedmedError(f"study error: {where}{err['msg'].removeprefix('Value error, ')}") from None
    # A study's cells keep their ledgers but not every round's updates (about 2 MB a round
    # each), unless the study file asks for them.
    base = {"output.save_updates": False, **config_mod.flatten(tree)}
    for cell in cells(spec):
        config_mod.from_flat({**base, **cell.settings, "seed": cell.seed})
    return base, spec


def cells(spec: SweepSpec) -> list[Cell]:
    keys = list(spec.grid)
    out = []
    for variant in spec.variants:
        both = sorted(set(variant) & set(keys))
        if both:
            raise FedmedError(f"study error: {both[0]} is set by a variant and by the grid: keep it in one of them")
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            settings = {**variant, **dict(zip(keys, values, strict=True))}
            out += [Cell(settings, seed) for seed in spec.seeds]
    return out


def finished(base: dict[str, Any], cell: Cell, out: Path) -> bool:
    """Done, with the settings the study now asks for (a cell run before the study file
    changed is run again)."""
    run = RunDirectory(out / "cells" / cell.name)
    if not (run / RunDirectory.SUMMARY).is_file():
        return False
    expected = config_mod.from_flat({**base, **cell.settings, "seed": cell.seed}).digest()
    return run.summary().get("config_sha256") == expected


def run_cell(base: dict[str, Any], cell: Cell, out: Path) -> dict[str, Any]:
    """One `fedmed simulate` process; returns the cell's summary."""
    folder = out / "cells"
    flat = {**base, **cell.settings, "seed": cell.seed, "output.dir": str(folder), "output.name": cell.name}
    cfg_path = folder / f".{cell.name}.toml"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg_path, tomli_w.dumps(config_mod.unflatten(flat)), private=False)
    run_dir = RunDirectory(folder / cell.name)
    if run_dir.path.exists():  # interrupted, or run with other settings: start it again
        shutil.rmtree(run_dir.path)
    log = folder / f".{cell.name}.log"
    with log.open("w", encoding="utf-8") as handle:
        result = subprocess.run([sys.executable, "-m", "fedmed.cli", "simulate", str(cfg_path)], stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        last = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()][-1:] or ["no output"]
        raise FedmedError(f"cell {cell.label} seed {cell.seed} failed: {last[0]} (log: {log})")
    return run_dir.summary()


def run_sweep(study: Path, out: Path) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    base, spec = load_study(study)
    todo = cells(spec)
    done = {c.name for c in todo if finished(base, c, out)}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task(f"{study.stem}: {len(todo)} cells ({len(done)} done before)", total=len(todo), completed=len(done))
        for cell in todo:
            if cell.name in done:
                continue
            progress.console.print(f"cell {cell.label}, seed {cell.seed}")
            run_cell(base, cell, out)
            progress.advance(bar)
    write_results(out, spec, todo)
    return out


# ---- results ------------------------------------------------------------------------


def _row(cell: Cell, out: Path) -> dict[str, Any]:
    run = RunDirectory(out / "cells" / cell.name)
    summary, rounds = run.summary(), run.rounds()
    # Accuracy on the hospitals' own test sets, pooled: FedAvg's federated evaluation, and
    # the same measure for FedBN (its global model keeps untrained normalisation layers)
    # and for the baselines.
    if rounds and rounds[-1].get("federated_eval"):
        hospital_acc = rounds[-1]["federated_eval"].get("accuracy")
    else:
        evals = [h["eval"] for h in (rounds[-1]["hospitals"].values() if rounds else []) if "eval" in h]
        total = sum(e["examples"] for e in evals)
        hospital_acc = sum(e["accuracy"] * e["examples"] for e in evals) / total if total else None
    hetero = run.heterogeneity()
    return {
        "cell": cell.label,
        "seed": cell.seed,
        **cell.settings,
        "accuracy": summary["test"].get("accuracy"),
        "macro_f1": summary["test"].get("macro_f1"),
        "auroc": summary["test"].get("auroc"),
        "hospital_test_accuracy": hospital_acc,
        "heterogeneity": hetero["index"] if hetero else None,
        "wall_s": summary.get("wall_seconds"),
        "round_accuracy": [r["test"]["accuracy"] for r in rounds],
    }


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def write_results(out: Path, spec: SweepSpec, todo: list[Cell]) -> None:
    rows = [_row(c, out) for c in todo]
    keys = sorted({k for c in todo for k in c.settings})
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        fields = ["cell", "seed", *keys, "accuracy", "macro_f1", "auroc", "hospital_test_accuracy", "heterogeneity", "wall_s"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["cell"], []).append(row)
    lines = [
        "| cell | seeds | global test accuracy | macro-F1 | AUROC | hospitals' test accuracy | heterogeneity |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, group in groups.items():
        cols = [_mean_std([r[m] for r in group]) for m in ("accuracy", "macro_f1", "auroc", "hospital_test_accuracy", "heterogeneity")]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cols) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plots(out, spec, todo, rows)


def _plots(out: Path, spec: SweepSpec, todo: list[Cell], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")

    if not spec.grid:  # variants only: one bar per cell
        _bars(out, spec, rows)
    else:
        _lines(out, spec, todo, rows)
    _curves(out, rows)


def _ylabel(spec: SweepSpec) -> str:
    return "final " + ("global test accuracy" if spec.metric == "accuracy" else "accuracy on the hospitals' test sets")


def _bars(out: Path, spec: SweepSpec, rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["cell"], []).append(row[spec.metric])
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(groups), 4))
    means = [statistics.mean(v) for v in groups.values()]
    errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in groups.values()]
    ax.bar(range(len(groups)), means, yerr=errs, capsize=4, color="#4a7ab5")
    ax.set_xticks(range(len(groups)), list(groups), rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(_ylabel(spec))
    ax.set_title(f"{out.name}: mean ± std over {len(spec.seeds)} seeds")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "final_accuracy.png", dpi=120)
    plt.close(fig)


def _lines(out: Path, spec: SweepSpec, todo: list[Cell], rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    series_key = spec.series or next(iter(spec.grid))
    by_series: dict[str, dict[str, list[float]]] = {}
    for cell, row in zip(todo, rows, strict=True):
        series = str(cell.settings.get(series_key, "all"))
        x = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cell.settings.items() if k != series_key) or "base"
        by_series.setdefault(series, {}).setdefault(x, []).append(row[spec.metric])
    fig, ax = plt.subplots(figsize=(7, 4))
    for series, points in by_series.items():
        xs = list(points)
        means = [statistics.mean(v) for v in points.values()]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in points.values()]
        ax.errorbar(range(len(xs)), means, yerr=errs, marker="o", capsize=3, label=series)
        ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
    ax.set_ylabel(_ylabel(spec))
    ax.set_title(f"{out.name}: mean ± std over {len(spec.seeds)} seeds")
    ax.legend(title=series_key.split(".")[-1])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "final_accuracy.png", dpi=120)
    plt.close(fig)


def _curves(out: Path, rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curves: dict[str, list[list[float]]] = {}
    for row in rows:
        curves.setdefault(row["cell"], []).append(row["round_accuracy"])
    for label, runs in curves.items():
        length = min(len(r) for r in runs)
        mean = [statistics.mean(r[i] for r in runs) for i in range(length)]
        ax.plot(range(1, length + 1), mean, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=120)
    plt.close(fig)
