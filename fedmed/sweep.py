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
OUT/cells/<cell>/; a cell whose process ended cleanly with a summary is skipped on a
re-run. Ctrl-C or SIGTERM stops the running cell and the sweep (exit 130 or 143); running
the same command again continues.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmed import config as config_mod
from fedmed.errors import FedmedError, os_error_line
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
    """(flat base settings, sweep spec); every cell's config is validated up front, so a
    study that cannot finish says so before its first cell runs."""
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
        cfg = config_mod.from_flat({**base, **cell.settings, "seed": cell.seed})
        if spec.metric == "hospital_test_accuracy" and cfg.federation.mode == "federated" and cfg.federation.fraction_evaluate == 0:
            raise FedmedError(
                f'study error: sweep.metric = "hospital_test_accuracy" needs the hospitals to evaluate, but cell {cell.label} '
                'has federation.fraction_evaluate = 0: raise it, or set sweep.metric = "accuracy" (the global test set)'
            )
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


def _unfinished_mark(cell: Cell, out: Path) -> Path:
    """Present from a cell's start until its `fedmed simulate` exits 0: a cell interrupted
    or failed after writing its summary is not taken for finished."""
    return out / "cells" / f".{cell.name}.unfinished"


def finished(base: dict[str, Any], cell: Cell, out: Path) -> bool:
    """Done, with the settings the study now asks for (a cell run before the study file
    changed is run again)."""
    run = RunDirectory(out / "cells" / cell.name)
    if not (run / RunDirectory.SUMMARY).is_file() or _unfinished_mark(cell, out).exists():
        return False
    expected = config_mod.from_flat({**base, **cell.settings, "seed": cell.seed}).digest()
    return run.summary().get("config_sha256") == expected


# A signal the sweep stops on -> the one its running cell is sent. Ctrl-C reaches the whole
# foreground process group in a terminal; a cell runs in a group of its own (so it gets each
# signal once, from the sweep), and SIGINT is passed to that group as a terminal would.
# A hang-up is passed on as SIGTERM, since the cell no longer hears the terminal's.
FORWARD = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
CELL_STOP_S = 10.0  # how long a signalled cell may take to stop before it is killed


@dataclass
class _Stop:
    """The signals received while the sweep runs. The handler only records them: the sweep
    acts on them between its own steps, never in the middle of a write."""

    signals: list[int] = field(default_factory=list)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    @property
    def exit_code(self) -> int:
        return 128 + self.signals[0]

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)


@contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():  # only it may take signals over
        yield stop
        return
    # A signal the sweep was started ignoring (`nohup`, `&` in a script) stays ignored.
    previous = {signum: signal.signal(signum, stop._record) for signum in FORWARD if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(process: subprocess.Popen, stop: _Stop) -> int:
    """The cell's exit code. Once the sweep is asked to stop, the cell gets the signal,
    CELL_STOP_S to end, then SIGKILL (at once on a second signal), and whatever it left in
    its process group is killed."""
    deadline: float | None = None
    killed = False
    while True:
        try:
            code = process.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop.requested and deadline is None:
            signum = FORWARD[signal.Signals(stop.signals[0])]
            if signum == signal.SIGINT:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            deadline = time.monotonic() + CELL_STOP_S
        if deadline is not None and not killed and (time.monotonic() > deadline or len(stop.signals) > 1):
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
    if stop.requested:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: nothing was left behind
    return code


def run_cell(base: dict[str, Any], cell: Cell, out: Path, stop: _Stop | None = None) -> bool:
    """One `fedmed simulate` process; True when it finished, False when the sweep was
    asked to stop while it ran (it was stopped, and is run again next time)."""
    stop = stop or _Stop()
    folder = out / "cells"
    flat = {**base, **cell.settings, "seed": cell.seed, "output.dir": str(folder), "output.name": cell.name}
    cfg_path = folder / f".{cell.name}.toml"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg_path, tomli_w.dumps(config_mod.unflatten(flat)), private=False)
    mark = _unfinished_mark(cell, out)
    mark.touch()
    run_dir = RunDirectory(folder / cell.name)
    if run_dir.path.exists():  # interrupted, or run with other settings: start it again
        shutil.rmtree(run_dir.path)
    log = folder / f".{cell.name}.log"
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedmed.cli", "simulate", str(cfg_path)],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        code = _wait(process, stop)
    if code == 0:
        mark.unlink()
        return True
    if stop.requested:
        return False
    last = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()][-1:] or [_no_output(folder)]
    raise FedmedError(f"cell {cell.label} seed {cell.seed} failed: {last[0].strip().removeprefix('error: ')[:300]} (log: {log})")


def _no_output(folder: Path) -> str:
    """Why a failed cell's log may be empty: its error could not be written either."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "no output"
    if free < 1 << 20:
        return f"no output, and the disk holding {folder} is full ({free // 1024} KiB free): free space and run again"
    return "no output"


def run_sweep(study: Path, out: Path) -> Path:
    """Run the study's unfinished cells, then write its results. Bad input, a failed cell or
    a file-system error is a FedmedError (one line); a signal stops the sweep with one line
    on stderr and exit code 128 + the signal's number."""
    with _stop_on_signals() as stop:
        try:
            return _sweep(study, out, stop)
        except OSError as exc:
            raise FedmedError(os_error_line(exc)) from None


def _sweep(study: Path, out: Path, stop: _Stop) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    base, spec = load_study(study)
    if out.exists() and not out.is_dir():
        raise FedmedError(f"--out {out} is a file: give a folder for the study's cells and results")
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedmedError(f"cannot create the --out folder {out}: {exc.strerror or exc}: {exc.filename}") from None
    todo = cells(spec)
    done = {c.name for c in todo if finished(base, c, out)}
    stopped_in: str | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task(f"{study.stem}: {len(todo)} cells ({len(done)} done before)", total=len(todo), completed=len(done))
        for cell in todo:
            if cell.name in done:
                continue
            if stop.requested:
                stopped_in = f"before cell {cell.label}, seed {cell.seed}"
                break
            progress.console.print(f"cell {cell.label}, seed {cell.seed}")
            if not run_cell(base, cell, out, stop):
                stopped_in = f"in cell {cell.label}, seed {cell.seed}, which will start over (log: {out / 'cells' / f'.{cell.name}.log'})"
                break
            done.add(cell.name)
            progress.advance(bar)
    if stopped_in is None and stop.requested:
        stopped_in = "with every cell finished, before writing the results"
    if stopped_in is None:
        write_results(out, spec, todo)  # a signal meanwhile lets it finish: the files stay whole
        if stop.requested:
            stopped_in = "while writing the results, every cell finished"
    if stop.requested:
        _say(f"interrupted {stopped_in}; {len(done)} of {len(todo)} cells finished, kept: run `fedmed sweep {study} --out {out}` again to continue")
        raise SystemExit(stop.exit_code)
    return out


def _say(line: str) -> None:
    """One line on stderr; after a hang-up there may be no terminal left to write to."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


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
    """results.csv, results.md and the plots, each replaced whole (a full disk or a signal
    leaves the previous file, never half of one). Runs without a value for sweep.metric are
    left out of final_accuracy.png and named in one line: a FedmedError when none has one."""
    rows = [_row(c, out) for c in todo]
    keys = sorted({k for c in todo for k in c.settings})
    table = io.StringIO(newline="")
    fields = ["cell", "seed", *keys, "accuracy", "macro_f1", "auroc", "hospital_test_accuracy", "heterogeneity", "wall_s"]
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", table.getvalue(), private=False)
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
    atomic_write(out / "results.md", "\n".join(lines) + "\n", private=False)
    _plots(out, spec, todo, rows)
    missing = [f"{r['cell']} seed {r['seed']}" for r in rows if r[spec.metric] is None]
    if len(missing) == len(rows):
        raise FedmedError(
            f"no run has a value for sweep.metric = {spec.metric}, so final_accuracy.png is not drawn "
            f"(results.csv, results.md and accuracy_per_round.png are written)"
        )
    if missing:
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        _say(f"warning: {len(missing)} of {len(rows)} runs have no {spec.metric} ({named}): final_accuracy.png leaves them out")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, image.getvalue(), private=False)


def _plots(out: Path, spec: SweepSpec, todo: list[Cell], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")

    if all(row[spec.metric] is None for row in rows):
        (out / "final_accuracy.png").unlink(missing_ok=True)  # an earlier run's would pass for this one's
    elif not spec.grid:  # variants only: one bar per cell
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
        if row[spec.metric] is not None:
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
    _save(fig, out / "final_accuracy.png")


def _lines(out: Path, spec: SweepSpec, todo: list[Cell], rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    series_key = spec.series or next(iter(spec.grid))
    by_series: dict[str, dict[str, list[float]]] = {}
    for cell, row in zip(todo, rows, strict=True):
        if row[spec.metric] is None:
            continue
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
    _save(fig, out / "final_accuracy.png")


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
    _save(fig, out / "accuracy_per_round.png")
