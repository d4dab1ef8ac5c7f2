"""`fedmed sweep`: a grid of runs that resumes where it stopped. The sweep and its cells
run in this process (the federated cells on one Ray runtime they share), except where a
signal stops it: there it is its own process, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmed import sweep
from fedmed.run.directory import RunDirectory

from .conftest import assert_clean_failure, fedmed, from_a_terminal

STUDY = """
seed = 0
[data]
image_size = 32
hospitals = 2
train_per_hospital = 8
test_per_hospital = 4
global_test_size = 8
cache_dir = "{cache}"
[federation]
mode = "local"
rounds = 1
[output]
save_model = false
[sweep]
seeds = [0]
[sweep.grid]
"train.lr" = [0.001, 0.01]
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished two-cell study: its file, its folder, and the first run's output."""
    root = tmp_path_factory.mktemp("study")
    path = root / "study.toml"
    path.write_text(STUDY.format(cache=root / "cache"))
    first = fedmed("sweep", path, "--out", root / "out")
    assert first.returncode == 0, first.stderr
    return path, root / "out", first


def test_a_study_writes_a_results_table_and_plots(study):
    _, out, first = study
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["train.lr"] for r in rows) == ["0.001", "0.01"]
    reported = sorted(float(r["accuracy"]) for r in rows)
    assert reported == sorted(RunDirectory(p.parent).summary()["test"]["accuracy"] for p in (out / "cells").glob("*/summary.json"))
    assert "± " in (out / "results.md").read_text()
    assert (out / "final_accuracy.png").exists() and (out / "accuracy_per_round.png").exists()
    assert "0 done before" in first.stdout
    assert "cell 1/2 done in " in first.stdout and "left" in first.stdout and "cell 2/2 done in " in first.stdout


def with_metric(text: str, metric: str) -> str:
    return text.replace("[sweep]\n", f'[sweep]\nmetric = "{metric}"\n')


def drop_hospital_evals(run: Path) -> None:
    """As if the hospitals had not evaluated in the last round."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    for hospital in last["hospitals"].values():
        hospital.pop("eval", None)
    (run / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")


def test_runs_without_the_plotted_metric_are_named_in_one_line(study, tmp_path):
    path, out, _ = study
    copy, edited = tmp_path / "out", tmp_path / "study.toml"
    shutil.copytree(out, copy)
    edited.write_text(with_metric(path.read_text(), "hospital_test_accuracy"))
    first, second = sorted((copy / "cells").glob("*/metrics.jsonl"))
    drop_hospital_evals(first.parent)
    some = fedmed("sweep", edited, "--out", copy)
    assert some.returncode == 0 and "Traceback" not in some.stderr
    assert some.stderr.strip().splitlines() == [
        f"warning: 1 of 2 runs have no hospital_test_accuracy (lr={cell_lr(first.parent)} seed 0): final_accuracy.png leaves them out"
    ]
    assert (copy / "final_accuracy.png").exists()
    drop_hospital_evals(second.parent)
    none = fedmed("sweep", edited, "--out", copy)
    assert_clean_failure(none, "no run has a value for sweep.metric = hospital_test_accuracy")
    assert (copy / "results.csv").exists() and not (copy / "final_accuracy.png").exists()


def cell_lr(run: Path) -> object:
    """The learning rate a cell ran with, from the config the sweep wrote for it."""
    return tomllib.loads((run.parent / f".{run.name}.toml").read_text())["train"]["lr"]


def test_a_resumed_sweep_skips_finished_cells(study):
    path, out, _ = study
    finished, interrupted = sorted((out / "cells").glob("*/summary.json"))
    stamp = finished.stat().st_mtime_ns
    interrupted.unlink()  # as if the run had been stopped during this cell
    result = fedmed("sweep", path, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "1 done before" in result.stdout
    assert finished.stat().st_mtime_ns == stamp and interrupted.exists()


def test_an_edited_study_runs_its_cells_again(study):
    path, out, _ = study
    path.write_text(path.read_text().replace('"train.lr" = [0.001, 0.01]', '"train.lr" = [0.001]').replace("rounds = 1", "rounds = 2"))
    result = fedmed("sweep", path, "--out", out)
    assert result.returncode == 0 and "0 done before" in result.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["train.lr"] for r in rows] == ["0.001"]


@pytest.mark.parametrize(
    ("grid", "needle"),
    [
        ('"train.lrr" = [1]', "unknown config key `train.lrr`"),
        ('"skew.beta" = [0.0]', "`skew.beta`"),
        ("seed = [1, 2]", "seed cannot be varied by a grid or a variant: list the seeds in sweep.seeds"),  # would train every cell with sweep.seeds' seed
        ('"output.name" = ["a"]', "output.name cannot be varied"),
        ('"train.lr" = []', "sweep.grid.train.lr is an empty list"),
        ('"simulation.ray_address" = ["127.0.0.1:6379"]', "simulation.ray_address cannot be varied"),  # the cells share one Ray runtime
    ],
)
def test_a_bad_study_is_one_line(tmp_path, grid, needle):
    path = tmp_path / "study.toml"
    path.write_text(f"[sweep]\nseeds = [0]\n[sweep.grid]\n{grid}\n")
    result = fedmed("sweep", path, "--out", tmp_path / "out")
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_variant_cannot_set_the_seed_either(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[sweep]\nvariants = [{"seed" = 3}]\n')
    result = fedmed("sweep", path, "--out", tmp_path / "out")
    assert result.returncode == 2 and "seed cannot be varied" in result.stderr


def test_a_setting_in_both_a_variant_and_the_grid_is_refused(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[sweep]\nvariants = [{"train.lr" = 0.1}]\n[sweep.grid]\n"train.lr" = [0.01]\n')
    result = fedmed("sweep", path)
    assert result.returncode == 2 and "set by a variant and by the grid" in result.stderr


def test_a_cell_that_did_not_end_cleanly_is_not_finished(study):
    """Its summary may be on disk (a cell stopped while writing its last files): only a
    `fedmed simulate` that exited 0 counts."""
    path, out, _ = study
    base, spec = sweep.load_study(path)
    cell = next(c for c in sweep.cells(spec) if sweep.finished(base, c, out))
    mark = out / "cells" / f".{cell.name}.unfinished"
    mark.touch()
    try:
        assert not sweep.finished(base, cell, out)
    finally:
        mark.unlink()
    assert sweep.finished(base, cell, out)


def test_a_failed_cell_is_one_line_naming_it_and_its_log(study):
    path, out, _ = study
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    failing = path.with_name("failing.toml")
    missing = path.parent / "no-such-data.npz"
    failing.write_text(path.read_text().replace("[sweep]\n", f'[sweep]\nvariants = [{{}}, {{"data.source" = "disk", "data.path" = "{missing}"}}]\n'))
    result = fedmed("sweep", failing, "--out", out)
    assert_clean_failure(result, "cell source=disk", "failed: data.path does not exist", "(log: ")
    log = Path(result.stderr.strip().rsplit("(log: ", 1)[1].removesuffix(")"))
    assert log.is_file() and "data.path does not exist" in log.read_text()
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")} == before
    base, spec = sweep.load_study(path)
    assert all(sweep.finished(base, cell, out) for cell in sweep.cells(spec))


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    path, out = tmp_path / "study.toml", tmp_path / "notes.txt"
    path.write_text('[sweep]\n[sweep.grid]\n"train.lr" = [0.01]\n')
    out.write_text("kept")
    assert_clean_failure(fedmed("sweep", path, "--out", out), f"--out {out} is a file")
    assert out.read_text() == "kept"


def test_a_metric_the_hospitals_never_measure_is_refused_before_any_cell_runs(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[federation]\nfraction_evaluate = 0\n[sweep]\nmetric = "hospital_test_accuracy"\n')
    result = fedmed("sweep", path, "--out", tmp_path / "out")
    assert_clean_failure(result, 'sweep.metric = "hospital_test_accuracy" needs the hospitals to evaluate', "federation.fraction_evaluate = 0")
    assert not (tmp_path / "out").exists()


def test_a_cell_starts_with_no_other_cells_data_in_memory(tiny_config):
    """The sweep's process and its Ray actors serve cell after cell: each forgets the
    data it cached for the one before (fedmed.data.sites keeps it per config)."""
    from fedmed.data.sites import forget, site_data

    site_data(tiny_config(), 0)
    assert site_data.cache_info().currsize > 0
    forget()
    assert site_data.cache_info().currsize == 0


FEDERATED = """
seed = 0
[data]
image_size = 32
hospitals = 2
train_per_hospital = 8
test_per_hospital = 4
global_test_size = 8
cache_dir = "{cache}"
[federation]
rounds = 1
[train]
batch_size = 8
[simulation]
cpus_per_hospital = 2.0  # one Ray actor to start, on 2 cores
[output]
save_model = false
[sweep]
seeds = [0, 1]
"""


def test_federated_cells_share_one_ray_runtime_and_its_actors(tmp_path):
    """Ray and its actors start once for the study; each cell is still a run of its own
    (its directory, summary and ledger), Flower's end-of-run warnings from every actor are
    gone, and Ray is stopped at the end."""
    import ray

    from fedmed.federation import ray_runtime

    path, out = tmp_path / "study.toml", tmp_path / "out"
    path.write_text(FEDERATED.format(cache=tmp_path / "cache"))
    with ray_runtime.shared() as runtime:  # the sweep's own: it joins this one
        result = fedmed("sweep", path, "--out", out)
        assert result.returncode == 0, result.stderr
        assert runtime.pools_started == 1
    assert not ray.is_initialized()
    assert "cell 2/2 done in " in result.stdout
    runs = [RunDirectory(p.parent) for p in (out / "cells").glob("*/summary.json")]
    assert sorted(r.summary()["seed"] for r in runs) == [0, 1] and all(any((r.path / "ledgers").iterdir()) for r in runs)
    assert not any("Manually terminating" in log.read_text() for log in (out / "cells").glob(".*.log"))


# ---- interrupts ---------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, session, ...),
    None for a process that is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields


def _processes() -> dict[int, list[str]]:
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return {pid: fields for pid in pids if (fields := _stat(pid)) is not None}


def _soon_none(find: Callable[[], list[int]], within: float = 5) -> list[int]:
    """What `find` still finds after `within` seconds (a SIGKILLed process is gone a moment
    after the signal, not at once)."""
    deadline = time.monotonic() + within
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _cell_started(out: Path, in_rounds: bool) -> bool:
    """The first cell has started (its mark is down), or finished a round."""
    if in_rounds:
        return any(p.stat().st_size for p in (out / "cells").glob("*/metrics.jsonl"))
    return any((out / "cells").glob(".*.unfinished"))


@pytest.mark.parametrize(
    ("signum", "to_group", "code", "in_rounds"),
    [(signal.SIGTERM, False, 143, False), (signal.SIGINT, True, 130, True)],
    ids=["kill-as-the-cell-starts", "ctrl-c-in-its-rounds"],
)
def test_a_signal_stops_the_sweep_and_its_cell_in_one_line(tmp_path, signum, to_group, code, in_rounds):
    """`kill` reaches the sweep alone, Ctrl-C the terminal's whole process group: either
    way the running cell is stopped (as it starts, or in its rounds), nothing is left
    running, and the cell is not taken for finished."""
    path, out = tmp_path / "study.toml", tmp_path / "out"
    path.write_text(STUDY.format(cache=tmp_path / "cache").replace("rounds = 1\n", "rounds = 100000\n"))  # its cells run until stopped
    fedmed_bin = Path(sys.executable).parent / "fedmed"
    process = subprocess.Popen([fedmed_bin, "sweep", path, "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=from_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while not _cell_started(out, in_rounds):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.02)
        started = time.monotonic()
        (os.killpg if to_group else os.kill)(process.pid, signum)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == code, stderr
    assert took < 10
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("interrupted in cell lr=0.001, seed 0") and f"fedmed sweep {path} --out {out}` again to continue" in stderr
    assert not _soon_none(lambda: [pid for pid, fields in _processes().items() if int(fields[3]) == process.pid])  # the sweep's session
    base, spec = sweep.load_study(path)
    assert not any(sweep.finished(base, cell, out) for cell in sweep.cells(spec))


def test_tuned_settings_are_chosen_on_validation_data_and_only_the_choice_is_reported(tmp_path):
    """Local-only cells (no Ray) with a validation split: per number of local epochs, the
    learning rate with the best validation accuracy; results.md reports that one only."""
    path = tmp_path / "study.toml"
    tuned = STUDY.format(cache=tmp_path / "cache").replace("hospitals = 2\n", "hospitals = 2\nval_fraction = 0.25\n")
    tuned = tuned.replace("[sweep]\nseeds = [0]", '[sweep]\nseeds = [0]\ntune = ["train.lr"]')
    path.write_text(tuned.replace('"train.lr" = [0.001, 0.01]', '"train.lr" = [0.001, 0.01]\n"train.local_epochs" = [1, 2]'))
    result = fedmed("sweep", path, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert sorted(r["train.local_epochs"] for r in rows) == ["1", "2"]  # one learning rate each
    tuning = (tmp_path / "out" / "tuning.md").read_text()
    assert tuning.count("| yes |") == 2 and tuning.count("lr=") == 4
    for row in rows:  # the chosen one has the better validation accuracy of its pair
        line = next(line for line in tuning.splitlines() if f"local_epochs={row['train.local_epochs']}" in line and f"lr={row['train.lr']}" in line)
        assert line.endswith("| yes |")


def test_tuning_without_a_validation_split_is_refused_before_any_cell_runs(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(cache=tmp_path / "cache").replace("[sweep]\nseeds = [0]", '[sweep]\nseeds = [0]\ntune = ["train.lr"]'))
    result = fedmed("sweep", path, "--out", tmp_path / "out")
    assert_clean_failure(result, "set data.val_fraction")
    assert not (tmp_path / "out" / "cells").exists()
