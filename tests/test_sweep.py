"""`fedmed sweep`: a grid of runs that resumes where it stopped. (Each cell is its own
`fedmed simulate` process, as in a real study; the sweep itself runs in this process.)"""

from __future__ import annotations

import csv

import pytest

from fedmed.run.directory import RunDirectory

from .conftest import fedmed

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
