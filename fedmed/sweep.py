"""`fedmed sweep STUDY.toml`: a grid of runs (variants x grid x seeds), resumable, with
a results table, mean +- std per cell and plots.

A study file is a fedmed config (the settings every cell shares) plus a [sweep]
table:

    [sweep]
    seeds = [0, 1, 2]
    variants = [{"skew.labels" = "dirichlet", "skew.beta" = 0.3}, ...]   # optional
    [sweep.grid]
    "federation.strategy" = ["fedavg", "fedprox"]

Cells run one after another in this process, each a run of its own into OUT/cells/<cell>/
(its output in OUT/cells/.<cell>.log), as `fedmed simulate` would run it. The federated
cells share one Ray runtime and its actors (`ray_runtime.shared()`: started by the first,
or the cluster given by --ray-address or simulation.ray_address), so a cell costs little
more than its rounds: Python, torch, Ray and the actors start once per sweep, not once per
cell. A cell that ended cleanly with a summary is skipped on a re-run. Ctrl-C or SIGTERM
stops the running cell and the sweep (exit 130 or 143); running the same command again
continues.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TextIO

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmed import config as config_mod
from fedmed.errors import FedmedError, os_error_line
from fedmed.run import interrupt
from fedmed.run.directory import RunDirectory, atomic_write

Scalar = bool | int | float | str


# Settings a study sets itself for every cell: a grid or a variant cannot vary them.
RESERVED = {
    "seed": "list the seeds in sweep.seeds",
    "output.dir": "pass --out",
    "output.name": "each cell is named after its settings",
    "simulation.ray_address": "the cells share one Ray runtime: pass --ray-address, or set it in the study's [simulation] table",
}


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
    tune: list[str] = Field(
        [],
        description="Grid keys chosen on validation data, never on a test set: for each combination of the other settings, the value(s) with the best mean validation accuracy over the seeds (the hospitals' `data.val_fraction` splits, pooled). results.md and the plots then report that choice only; tuning.md lists every value's validation accuracy.",
    )

    @model_validator(mode="after")
    def _varies_what_it_can(self) -> SweepSpec:
        for key in [*self.grid, *(k for variant in self.variants for k in variant)]:
            if key in RESERVED:
                raise ValueError(f"{key} cannot be varied by a grid or a variant: {RESERVED[key]}")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep.grid.{key} is an empty list: give it at least one value")
        for key in self.tune:
            if key not in self.grid:
                raise ValueError(f"sweep.tune names {key}, which sweep.grid does not vary: tune a grid key")
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


def load_study(path: Path, ray_address: str | None = None) -> tuple[dict[str, Any], SweepSpec]:
    """(flat base settings, sweep spec); every cell's config is validated up front, so a
    study that cannot finish says so before its first cell runs. `ray_address`: the Ray
    cluster every cell runs on (--ray-address), in place of the study's."""
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
    if ray_address is not None:
        base["simulation.ray_address"] = ray_address
    for cell in cells(spec):
        cfg = config_mod.from_flat({**base, **cell.settings, "seed": cell.seed})
        if spec.tune and not (cfg.data.val_fraction and (cfg.federation.mode != "federated" or cfg.federation.fraction_evaluate)):
            raise FedmedError(
                f"study error: sweep.tune chooses {', '.join(spec.tune)} on validation data, but cell {cell.label} has none: set data.val_fraction (and hospitals that evaluate)"
            )
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
    """Present from a cell's start until it finished cleanly: a cell interrupted or failed
    after writing its summary is not taken for finished."""
    return out / "cells" / f".{cell.name}.unfinished"


def finished(base: dict[str, Any], cell: Cell, out: Path) -> bool:
    """Done, with the settings the study now asks for (a cell run before the study file
    changed is run again)."""
    run = RunDirectory(out / "cells" / cell.name)
    if not (run / RunDirectory.SUMMARY).is_file() or _unfinished_mark(cell, out).exists():
        return False
    expected = config_mod.from_flat({**base, **cell.settings, "seed": cell.seed}).digest()
    return run.summary().get("config_sha256") == expected


# The signals the sweep stops on. Between cells the sweep only records them, and stops
# before the next step; while a cell runs, SIGINT and SIGTERM stop it as they stop
# `fedmed simulate` (interrupt.stop_on_signals), and a hang-up is passed on to it as
# SIGTERM, since the cell no longer hears the terminal.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Stop:
    """The signals received while the sweep runs. The handler only records them: the sweep
    acts on them between its own steps, never in the middle of a write."""

    signals: list[int] = field(default_factory=list)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        if signum == signal.SIGHUP and interrupt.watching():  # a cell is running
            signal.raise_signal(signal.SIGTERM)


@contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():  # only it may take signals over
        yield stop
        return
    # A signal the sweep was started ignoring (`nohup`, `&` in a script) stays ignored.
    previous = {signum: signal.signal(signum, stop._record) for signum in SIGNALS if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_cell(base: dict[str, Any], cell: Cell, out: Path, stop: _Stop | None = None) -> bool:
    """One cell, run in this process (a federated one on the sweep's Ray runtime), its
    output in OUT/cells/.<cell>.log. True when it finished; False when a signal stopped it
    (recorded in `stop`; the cell starts over next time). A failed cell is one line naming
    it and its log (FedmedError)."""
    stop = stop or _Stop()
    folder = out / "cells"
    flat = {**base, **cell.settings, "seed": cell.seed, "output.dir": str(folder), "output.name": cell.name}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f".{cell.name}.toml", tomli_w.dumps(config_mod.unflatten(flat)), private=False)  # the cell's settings, kept beside it
    mark = _unfinished_mark(cell, out)
    mark.touch()
    run_dir = RunDirectory(folder / cell.name)
    if run_dir.path.exists():  # interrupted, or run with other settings: start it again
        shutil.rmtree(run_dir.path)
    log = folder / f".{cell.name}.log"
    failure = ""
    try:
        with log.open("w", encoding="utf-8", buffering=1) as handle, _output_to(handle), interrupt.stop_on_signals(on_stop=_quiet_flower):
            if stop.requested:  # signalled as the cell started, before the signals were its own
                return False
            try:
                _run(config_mod.from_flat(flat))
            except interrupt.Interrupted as exc:
                stop.signals.append(exc.code - 128)
                return False
            except (FedmedError, OSError) as exc:
                failure = str(exc) if isinstance(exc, FedmedError) else os_error_line(exc)
                print(f"error: {failure}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - a bug, or Flower's engine failing: its traceback goes to the log
                traceback.print_exc()
                failure = f"{type(exc).__name__}: {exc}"
    except interrupt.Stop as exc:  # outside the cell's rounds (as it started, or as it ended)
        stop.signals.append(exc.signum)
        return False
    if failure:
        raise FedmedError(f"cell {cell.label} seed {cell.seed} failed: {failure[:300]} (log: {log})")
    mark.unlink()
    return True


def _run(cfg: config_mod.FedmedConfig) -> None:
    """What `fedmed simulate` runs for a config, with only this run's data in memory."""
    from fedmed.data.sites import forget

    forget()  # the previous cell's
    if cfg.federation.mode == "federated":
        from fedmed.federation.simulation import run_simulation

        run_simulation(cfg)
    else:
        from fedmed.baselines import run_baseline

        run_baseline(cfg)


def _quiet_flower() -> None:
    """Once a cell is stopped, Flower's logs about the Ray actors stopped under it are noise."""
    logging.getLogger("flwr").disabled = True


@contextmanager
def _output_to(log: TextIO) -> Iterator[None]:
    """Everything the cell prints goes to its log, as when each cell was a process of its
    own: Python's streams, and the file descriptors under them (Flower's and Ray's loggers
    hold the streams they started with; Ray's core writes to descriptor 2)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@contextmanager
def _runtime(federated: bool) -> Iterator[None]:
    """One Ray runtime and actor pool for every federated cell (none for baselines only)."""
    if not federated:
        yield
        return
    from fedmed.federation.simulation import ray_environment

    ray_environment()  # before Ray is imported
    from fedmed.federation import ray_runtime

    with ray_runtime.shared():
        yield


def fixed_seconds(run: RunDirectory, wall: float) -> float:
    """What a run cost besides its rounds: its wall time less its rounds' (`time_s` in
    metrics.jsonl). Start-up, the last evaluation, writing the summary, stopping."""
    return wall - sum(r.get("time_s", 0.0) for r in run.rounds())


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def run_sweep(study: Path, out: Path, ray_address: str | None = None) -> Path:
    """Run the study's unfinished cells, then write its results. Bad input, a failed cell or
    a file-system error is a FedmedError (one line); a signal stops the sweep: Interrupted
    says where, with the exit code (128 + the signal's number)."""
    with _stop_on_signals() as stop:
        try:
            return _sweep(study, out, stop, ray_address)
        except OSError as exc:
            raise FedmedError(os_error_line(exc)) from None


def _sweep(study: Path, out: Path, stop: _Stop, ray_address: str | None) -> Path:
    from rich.console import Console

    base, spec = load_study(study, ray_address)
    if out.exists() and not out.is_dir():
        raise FedmedError(f"--out {out} is a file: give a folder for the study's cells and results")
    todo = cells(spec)
    done = {c.name for c in todo if finished(base, c, out)}
    pending = [c for c in todo if c.name not in done]
    federated = any(config_mod.from_flat({**base, **c.settings, "seed": c.seed}).federation.mode == "federated" for c in pending)
    if federated:
        from fedmed.federation.simulation import check_ray_address

        check_ray_address(base.get("simulation.ray_address", ""))
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedmedError(f"cannot create the --out folder {out}: {exc.strerror or exc}: {exc.filename}") from None
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{study.stem}: {len(todo)} cells ({len(done)} done before)")
    stopped_in: str | None = None
    walls: list[float] = []
    with _runtime(federated):
        for cell in pending:
            if stop.requested:
                stopped_in = f"before cell {cell.label}, seed {cell.seed}"
                break
            console.print(f"cell {cell.label}, seed {cell.seed}")
            started = time.monotonic()
            if not run_cell(base, cell, out, stop):
                stopped_in = f"in cell {cell.label}, seed {cell.seed}, which will start over (log: {out / 'cells' / f'.{cell.name}.log'})"
                break
            walls.append(time.monotonic() - started)
            done.add(cell.name)
            fixed = fixed_seconds(RunDirectory(out / "cells" / cell.name), walls[-1])
            left = statistics.mean(walls[1:] or walls) * (len(todo) - len(done))  # the first also paid the one-off start-up (imports, Ray's actors)
            estimate = f"; about {_duration(left)} left" if left else ""
            console.print(f"cell {len(done)}/{len(todo)} done in {_duration(walls[-1])} (fixed {fixed:.1f} s){estimate}")
    if stopped_in is None and stop.requested:
        stopped_in = "with every cell finished, before writing the results"
    if stopped_in is None:
        write_results(out, spec, todo)  # a signal meanwhile lets it finish: the files stay whole
        if stop.requested:
            stopped_in = "while writing the results, every cell finished"
    if stop.requested:
        line = f"interrupted {stopped_in}; {len(done)} of {len(todo)} cells finished, kept: run `fedmed sweep {study} --out {out}` again to continue"
        raise interrupt.Interrupted(line, stop.signals[0])
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
        "validation_accuracy": (summary.get("validation") or {}).get("accuracy"),
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
    if spec.tune:  # only the choices made on validation data are reported
        chosen = _choose(out, spec, todo, rows)
        for row in rows:
            row["chosen"] = row["cell"] in chosen
        todo, rows = [c for c in todo if c.label in chosen], [r for r in rows if r["chosen"]]
    keys = sorted({k for c in todo for k in c.settings})
    table = io.StringIO(newline="")
    fields = ["cell", "seed", *keys, "accuracy", "macro_f1", "auroc", "hospital_test_accuracy", "heterogeneity", "validation_accuracy", "wall_s"]
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


def _choose(out: Path, spec: SweepSpec, todo: list[Cell], rows: list[dict]) -> set[str]:
    """The cells (labels) whose tuned values have the best mean validation accuracy over
    the seeds among the cells alike in every other setting; tuning.md lists them all."""
    missing = [f"{r['cell']} seed {r['seed']}" for r in rows if r["validation_accuracy"] is None]
    if missing:
        raise FedmedError(f"study error: sweep.tune needs every run's validation accuracy, and {missing[0]} has none: set data.val_fraction")
    groups: dict[str, dict[str, list[float]]] = {}
    for cell, row in zip(todo, rows, strict=True):
        rest = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cell.settings.items() if k not in spec.tune) or "base"
        groups.setdefault(rest, {}).setdefault(cell.label, []).append(row["validation_accuracy"])
    chosen, lines = set(), ["| settings | tuned | validation accuracy | chosen |", "|---|---|---|---|"]
    for rest, options in groups.items():
        best = max(options, key=lambda label: statistics.mean(options[label]))
        chosen.add(best)
        for label, values in options.items():
            tuned = ", ".join(part for part in label.split(", ") if part.split("=")[0] in {k.split(".")[-1] for k in spec.tune})
            lines.append(f"| {rest} | {tuned} | {_mean_std(values)} | {'yes' if label == best else ''} |")
    atomic_write(out / "tuning.md", "\n".join(lines) + "\n", private=False)
    return chosen


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
