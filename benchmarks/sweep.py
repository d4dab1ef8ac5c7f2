"""A sweep's fixed cost per cell, before and after its cells shared one Ray runtime.

The study: 12 quickstart-sized federated cells (simulations/quickstart.toml: 8 hospitals,
64x64 images, the 61k-parameter CNN, FedAvg), strategy x learning rate x seed. To keep the
benchmark to minutes on 2 cores, each cell runs 2 rounds on 100 training images per
hospital, 20 test images per hospital and a global test set of 200 (the quickstart: 10
rounds on 600, 50 and 800); the fixed cost does not depend on them.

- before: each cell its own `fedmed simulate` process, as `fedmed sweep` ran them until
  the cells shared a runtime (Python, torch, Ray and its actors started per cell);
- after: `fedmed sweep` itself (one process, one Ray runtime and actor pool for all cells).

A cell's fixed cost is its wall time less its rounds' (`time_s` in its metrics.jsonl):
start-up, the last evaluation, writing the summary, stopping. The Ray actors' start-up
falls in a run's first round, so "before" also shows how much longer its first rounds
take. The data is generated before either is timed; both run back to back.

    python benchmarks/sweep.py [--rounds 2] [--before-only | --after-only]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

from fedmed import config as config_mod
from fedmed.run.directory import RunDirectory
from fedmed.sweep import Cell, cells, fixed_seconds, load_study

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations" / "quickstart.toml"
SMALLER = {"data.train_per_hospital": 100, "data.test_per_hospital": 20, "data.global_test_size": 200}
GRID = '[sweep]\nseeds = [0, 1]\n[sweep.grid]\n"federation.strategy" = ["fedavg", "fedprox", "fedadam"]\n"train.lr" = [0.001, 0.003]\n'
DONE = re.compile(r"cell (\d+)/\d+ done in .*\(fixed ([\d.]+) s\)")


def write_study(folder: Path, rounds: int, cache: Path) -> Path:
    """The quickstart's settings, smaller (SMALLER), crossed with GRID: 12 cells."""
    flat = {
        **config_mod.flatten(tomllib.loads(QUICKSTART.read_text())),
        **SMALLER,
        "federation.rounds": rounds,
        "data.cache_dir": str(cache),
        "output.save_model": False,
    }
    path = folder / "study.toml"
    path.write_text(tomli_w.dumps(config_mod.unflatten(flat)) + GRID)
    return path


def before(study: Path, out: Path, todo: list[Cell]) -> list[dict]:
    """Each cell as its own `fedmed simulate` process: the old way."""
    base, _ = load_study(study)
    folder = out / "cells"
    folder.mkdir(parents=True)
    rows = []
    for i, cell in enumerate(todo, 1):
        flat = {**base, **cell.settings, "seed": cell.seed, "output.dir": str(folder), "output.name": cell.name}
        cfg = folder / f".{cell.name}.toml"
        cfg.write_text(tomli_w.dumps(config_mod.unflatten(flat)))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "fedmed.cli", "simulate", str(cfg)], capture_output=True, text=True)
        wall = time.monotonic() - started
        if done.returncode != 0:
            sys.exit(f"cell {cell.label} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        rows.append(_row(RunDirectory(folder / cell.name), wall, fixed_seconds(RunDirectory(folder / cell.name), wall)))
        print(f"  before: cell {i}/{len(todo)}  wall {wall:5.1f} s  fixed {rows[-1]['fixed']:4.1f} s  first round {rows[-1]['first']:4.1f} s", flush=True)
    return rows


def after(study: Path, out: Path, todo: list[Cell]) -> tuple[list[dict], float]:
    """`fedmed sweep`: its own lines give each cell's fixed cost; (rows, the sweep's wall time)."""
    started = time.monotonic()
    sweep = subprocess.Popen([sys.executable, "-m", "fedmed.cli", "sweep", str(study), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fixed: dict[int, float] = {}
    for line in sweep.stdout:
        print(f"  after: {line.rstrip()}", flush=True)
        if match := DONE.search(line):
            fixed[int(match[1])] = float(match[2])
    if sweep.wait() != 0:
        sys.exit("the sweep failed")
    total = time.monotonic() - started
    rows = []
    for i, cell in enumerate(todo, 1):
        run = RunDirectory(out / "cells" / cell.name)
        rounds = sum(r["time_s"] for r in run.rounds())
        rows.append(_row(run, rounds + fixed[i], fixed[i]))
    return rows, total


def _row(run: RunDirectory, wall: float, fixed: float) -> dict:
    rounds = run.rounds()
    return {"wall": wall, "fixed": fixed, "first": rounds[0]["time_s"], "later": statistics.mean(r["time_s"] for r in rounds[1:]) if len(rounds) > 1 else None}


def report(name: str, rows: list[dict], total: float) -> None:
    fixed = [r["fixed"] for r in rows]
    later = [r["later"] for r in rows if r["later"] is not None]
    print(
        f"{name:>7}: fixed per cell mean {statistics.mean(fixed):4.1f} s (min {min(fixed):.1f}, max {max(fixed):.1f}); "
        f"cell wall mean {statistics.mean(r['wall'] for r in rows):5.1f} s; first round mean {statistics.mean(r['first'] for r in rows):4.1f} s"
        + (f", later rounds {statistics.mean(later):4.1f} s" if later else "")
        + f"; {len(rows)} cells in {total:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--before-only", action="store_true")
    which.add_argument("--after-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from fedmed.data.sites import ensure_data

    with tempfile.TemporaryDirectory(prefix="fedmed-bench-sweep-") as tmp:
        root = Path(tmp)
        study = write_study(root, args.rounds, Path(os.environ.get("FEDMED_CACHE", root / "cache")))
        base, spec = load_study(study)
        todo = cells(spec)
        for cell in todo:  # data generation is no part of a cell's fixed cost
            ensure_data(config_mod.from_flat({**base, **cell.settings, "seed": cell.seed}))
        results = {}
        if not args.after_only:
            started = time.monotonic()
            rows = before(study, root / "before", todo)
            results["before"] = (rows, time.monotonic() - started)
        if not args.before_only:
            results["after"] = after(study, root / "after", todo)
        print()
        for name, (rows, total) in results.items():
            report(name, rows, total)


if __name__ == "__main__":
    main()
