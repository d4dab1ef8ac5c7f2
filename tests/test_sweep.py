"""`fedmed sweep`: a grid of runs that resumes where it stopped."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

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


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmed.cli", "sweep", *args], capture_output=True, text=True, timeout=300)


def test_a_resumed_sweep_skips_finished_cells(tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(STUDY.format(cache=tmp_path / "cache"))
    out = tmp_path / "out"
    assert sweep(str(study), "--out", str(out)).returncode == 0
    summaries = sorted((out / "cells").glob("*/summary.json"))
    assert len(summaries) == 2
    finished, interrupted = summaries
    stamp = finished.stat().st_mtime_ns
    interrupted.unlink()  # as if the run had been stopped during this cell
    result = sweep(str(study), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "1 done before" in result.stdout
    assert finished.stat().st_mtime_ns == stamp and interrupted.exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["train.lr"] for r in rows) == ["0.001", "0.01"]
    assert "± " in (out / "results.md").read_text()
    assert (out / "final_accuracy.png").exists() and (out / "accuracy_per_round.png").exists()


@pytest.mark.parametrize(
    ("grid", "needle"),
    [('"train.lrr" = [1]', "unknown config key `train.lrr`"), ('"skew.beta" = [0.0]', "`skew.beta`")],
)
def test_a_bad_study_is_one_line(tmp_path, grid, needle):
    study = tmp_path / "study.toml"
    study.write_text(f"[sweep]\nseeds = [0]\n[sweep.grid]\n{grid}\n")
    result = sweep(str(study), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_an_edited_study_runs_its_cells_again(tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(STUDY.format(cache=tmp_path / "cache"))
    out = tmp_path / "out"
    assert sweep(str(study), "--out", str(out)).returncode == 0
    study.write_text(STUDY.format(cache=tmp_path / "cache").replace("rounds = 1", "rounds = 2"))
    result = sweep(str(study), "--out", str(out))
    assert result.returncode == 0 and "0 done before" in result.stdout


def test_a_setting_in_both_a_variant_and_the_grid_is_refused(tmp_path):
    study = tmp_path / "study.toml"
    study.write_text('[sweep]\nvariants = [{"train.lr" = 0.1}]\n[sweep.grid]\n"train.lr" = [0.01]\n')
    result = sweep(str(study))
    assert result.returncode == 2 and "set by a variant and by the grid" in result.stderr
