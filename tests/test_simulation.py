"""Real Flower simulations on the real Ray backend, attached to the session's Ray head as
to a user's cluster: the run directory, and the same results as the federation logic run
in this process (tests/inprocess.py), so the fast tests test what Ray runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmed import config as config_mod
from fedmed.federation import ray_runtime
from fedmed.federation.simulation import run_simulation
from fedmed.ledger.chain import LedgerFile
from fedmed.run.directory import RunDirectory
from fedmed.run.record import TIMING_FIELDS

from .conftest import TINY
from .inprocess import run_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(cache_dir, tmp_path_factory):
    def make(out: str, *extra: str) -> config_mod.FedmedConfig:
        return config_mod.load(None, [*TINY, *extra], {"data.cache_dir": cache_dir, "output.dir": str(tmp_path_factory.mktemp(out))})

    return make


# Partial participation: 6 of 20 hospitals train (and 6 evaluate) each round, drawn from
# the seed and the round, not from Flower's node ids (random, new in every run). Three of
# the 20 send their updates negated; the server takes a trimmed mean; each hospital keeps
# its own classifier head (FedPer).
SHARE = (
    "data.hospitals=20", "data.train_per_hospital=8", "data.test_per_hospital=4", "federation.fraction_train=0.3", "federation.fraction_evaluate=0.3",
    "federation.strategy=trimmed_mean", "federation.trim_fraction=0.2", "attack.kind=sign_flip", "attack.hospitals=3", "personal.method=fedper",
)  # fmt: skip


@pytest.fixture(scope="module")
def ray_runs(settings, ray_head) -> tuple[Path, Path]:
    """The same seeded run twice on Ray, the second on the first's actors (as a sweep's cells)."""
    with ray_runtime.shared():
        return tuple(run_simulation(settings(name, *SHARE, f"simulation.ray_address='{ray_head.address}'")) for name in ("ray-a", "ray-b"))


@pytest.fixture(scope="module")
def ray_run(ray_runs) -> Path:
    return ray_runs[0]


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_a_simulation_writes_a_complete_run_directory(ray_run):
    out = RunDirectory(ray_run)
    assert {p.name for p in ray_run.iterdir()} >= {
        out.CONFIG, out.METRICS, out.SUMMARY, out.MODEL, out.CHECKPOINT, out.HETEROGENEITY, out.HEATMAP, out.LEDGERS, out.UPDATES,
    }
    records = out.rounds()
    assert [r["round"] for r in records] == [1, 2]
    summary = out.summary()
    assert (summary["rounds"], summary["num_hospitals"], summary["mode"]) == (2, 20, "federated")
    assert summary["test"] == {k: records[-1]["test"][k] for k in summary["test"]}
    assert summary["wall_seconds"] >= records[-1]["elapsed_s"]
    took_part = {site for r in records for site in r["hospitals"]}
    ledgers = sorted(p.name for p in (ray_run / out.LEDGERS).glob("*/*.jsonl"))
    assert ledgers == sorted([*(f"{site}.jsonl" for site in took_part), "server.jsonl"])  # only the hospitals asked


def test_a_seeded_run_asking_a_share_of_the_hospitals_repeats_exactly(ray_runs):
    """Who trains and who evaluates is drawn from the seed and the round over the hospitals'
    names, not Flower's node ids: the same records twice."""
    first, second = (RunDirectory(run) for run in ray_runs)
    assert _without_timing(first.rounds()) == _without_timing(second.rounds())
    trained = [sorted(site for site, phases in r["hospitals"].items() if "train" in phases) for r in first.rounds()]
    assert [len(sites) for sites in trained] == [6, 6] and trained[0] != trained[1]
    server = LedgerFile.read(next((first.path / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records
    assert [r["payload"]["asked"] for r in server if r["event"] == "train-round"] == trained  # the ledger says who was asked


def test_ray_and_the_in_process_federation_give_the_same_results(ray_run, settings):
    """The same seed and config: the same metrics, round by round, and the same model."""
    here = run_in_process(settings("in-process", *SHARE))
    assert _without_timing(RunDirectory(ray_run).rounds()) == _without_timing(RunDirectory(here).rounds())
    ray_model, here_model = torch.load(ray_run / RunDirectory.MODEL), torch.load(here / RunDirectory.MODEL)
    assert all(torch.equal(ray_model[k], here_model[k]) for k in ray_model)


def test_a_simulation_leaves_the_ray_cluster_it_attached_to_running(ray_run, ray_head):
    assert RunDirectory(ray_run).rounds()  # it ran there
    assert ray_head.process.poll() is None, "fedmed must not stop a Ray cluster it did not start"


def test_a_trimmed_mean_under_attack_with_personal_heads_is_recorded_and_audited(ray_run, tmp_path):
    import shutil

    import numpy as np

    from fedmed.audit.report import audit

    summary = RunDirectory(ray_run).summary()
    assert summary["attack"]["kind"] == "sign_flip" and len(summary["attack"]["hospitals"]) == 3
    evaluated = [phases["eval"] for r in RunDirectory(ray_run).rounds() for phases in r["hospitals"].values() if "eval" in phases]
    assert evaluated and all("personal_accuracy" in e for e in evaluated)
    assert audit([ray_run], out_dir=tmp_path / "audit") == 0
    edited = tmp_path / "edited"
    shutil.copytree(ray_run, edited)
    path = RunDirectory(edited).updates_of(1)
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    name = next(n for n in arrays if not n.startswith(("sent/", "@")))
    arrays[name] = arrays[name] * 1.01
    np.savez(path, **arrays)
    assert audit([edited], out_dir=tmp_path / "audit-edited") == 1
