"""Real Flower simulations on the real Ray backend (3 hospitals, 2 rounds, tiny images)."""

import json
from pathlib import Path

import pytest

from fedmed.federation.simulation import run_simulation
from fedmed.outputs import TIMING_FIELDS, read_metrics
from fedmed.baselines import run_baseline

from .conftest import ray_head_on_loopback

pytestmark = pytest.mark.slow


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_simulation_writes_a_complete_run_directory_and_is_reproducible(tiny_config):
    first = run_simulation(tiny_config("output.name='a'"))
    assert {p.name for p in first.iterdir()} >= {"config.toml", "metrics.jsonl", "summary.json", "model.pt"}
    records = read_metrics(first)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert set(r["hospitals"]) == {"hospital-01", "hospital-02", "hospital-03"}
        for h in r["hospitals"].values():
            assert {"train", "eval"} <= set(h)
            assert h["train"]["examples"] == 24 and h["eval"]["examples"] == 12
        assert r["test"]["examples"] == 24
    summary = json.loads((first / "summary.json").read_text())
    for key in ("accuracy", "macro_f1", "auroc"):
        assert key in summary["test"]
    assert (summary["rounds"], summary["num_hospitals"]) == (2, 3)
    assert summary["wall_seconds"] > 0
    assert set(summary["per_hospital"]) == {"hospital-01", "hospital-02", "hospital-03"}

    hetero = json.loads((first / "heterogeneity.json").read_text())
    assert hetero["label_counts"] == [[6, 6, 6, 6]] * 3 and hetero["index"] == 0.0
    assert (first / "heterogeneity.png").stat().st_size > 1000

    second = run_simulation(tiny_config("output.name='b'"))
    assert _without_timing(read_metrics(first)) == _without_timing(read_metrics(second))


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_baselines_write_the_same_kind_of_run_directory(tiny_config, mode):
    out = run_baseline(tiny_config(f"federation.mode='{mode}'"))
    summary = json.loads((out.path / "summary.json").read_text())
    assert summary["mode"] == mode and summary["rounds"] == 2
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert set(summary["per_hospital"]) == {"hospital-01", "hospital-02", "hospital-03"}
    assert len(read_metrics(out.path)) == 2


def test_pooled_takes_as_many_sample_gradient_steps_as_federated(tiny_config):
    fed = read_metrics(run_simulation(tiny_config("output.name='fed'")))
    pooled = read_metrics(run_baseline(tiny_config("federation.mode='pooled'", "output.name='pooled'")).path)
    for f, p in zip(fed, pooled):
        fed_steps = sum(h["train"]["sample_gradients"] for h in f["hospitals"].values())
        assert p["train"]["sample_gradients"] == fed_steps


def test_simulation_attaches_to_a_running_ray_head(tiny_config):
    """A Ray head started here on loopback, as a user's cluster; fedmed must use it and leave it running."""
    with ray_head_on_loopback() as (address, head):
        out = run_simulation(tiny_config(f"simulation.ray_address='{address}'"))
        assert [r["round"] for r in read_metrics(out)] == [1, 2]
        assert head.poll() is None, "fedmed must not stop a Ray cluster it did not start"


def _run_files_text(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in run.iterdir() if p.suffix in (".toml", ".json", ".jsonl"))


def test_simulation_on_an_image_folder_written_by_make_demo(tiny_config, tmp_path):
    from fedmed.data.export import export_demo

    export_demo(tiny_config(), tmp_path / "hospitals")
    run = run_simulation(tiny_config("data.source=disk", f"data.path='{tmp_path / 'hospitals'}'", "data.partition=folders"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["format"] == "imagefolder"
    assert (summary["data"]["train"], summary["data"]["test"]) == (72, 36)
    records = read_metrics(run)
    assert all(h["train"]["examples"] == 24 for h in records[-1]["hospitals"].values())
    text = _run_files_text(run)
    assert str(tmp_path / "hospitals") not in text and ".png" not in text and "Training" not in text


def test_simulation_on_nifti_volumes_split_by_patient(tiny_config, tmp_path):
    import numpy as np

    from tests import mri_fixtures as fx

    rng = np.random.default_rng(0)
    classes = ("glioma", "meningioma", "no_tumour", "pituitary")
    for i in range(16):
        fx.nifti(tmp_path / "vols" / classes[i % 4] / f"patient{i:02d}.nii.gz", fx.brain_volume(rng, shape=(40, 40, 24), brain_slices=(2, 22)))
    run = run_simulation(tiny_config("data.source=disk", f"data.path='{tmp_path / 'vols'}'", "data.test_fraction=0.25"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["format"] == "nifti" and summary["data"]["images"] == 16 * 12
    assert summary["data"]["test"] == 4 * 12  # whole volumes: 4 of 16 patients
    text = _run_files_text(run)
    assert "patient" not in text and str(tmp_path / "vols") not in text


def test_skewed_hospitals_report_their_heterogeneity(tiny_config):
    from fedmed.data.demo import DemoSpec

    cfg = tiny_config("skew.labels=classes", "skew.classes_per_hospital=2", "skew.quantity=power", "skew.min_size=4", "federation.rounds=1")
    run = run_simulation(cfg)
    hetero = json.loads((run / "heterogeneity.json").read_text())
    assert hetero["label_counts"] == [list(row) for row in DemoSpec.from_config(cfg.data, cfg.seed, cfg.skew).train_counts]
    assert all(sum(1 for v in row if v) == 2 for row in hetero["label_counts"])
    assert hetero["index"] > 0.2


def test_fedbn_keeps_normalisation_layers_at_each_hospital(tiny_config):
    import torch

    from fedmed.models import build_model, norm_keys

    cfg = tiny_config("federation.strategy=fedbn")
    run = run_simulation(cfg)
    initial = build_model(cfg.model, 4, seed=cfg.seed).state_dict()
    final = torch.load(run / "model.pt")
    local = norm_keys(build_model(cfg.model, 4, seed=0))
    assert local and all(torch.equal(final[k], initial[k]) for k in local)  # never sent, never averaged
    assert any(not torch.equal(final[k], initial[k]) for k in final if k not in local)
    rounds = read_metrics(run)
    assert {h["train"]["local_arrays_restored"] for h in rounds[0]["hospitals"].values()} == {0}
    assert {h["train"]["local_arrays_restored"] for h in rounds[1]["hospitals"].values()} == {len(local)}


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi"])
def test_other_strategies_train(tiny_config, strategy):
    run = run_simulation(tiny_config(f"federation.strategy={strategy}", "federation.rounds=1"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["examples"] == 24 and summary["test"]["loss"] > 0


def test_unlabelled_hospitals_pseudo_label_and_report_counts(tiny_config):
    cfg = tiny_config("labels.scenario=unlabelled", "labels.hospitals=0.34", "labels.unlabelled=pseudo", "labels.threshold=0.3")
    run = run_simulation(cfg)
    last = read_metrics(run)[-1]["hospitals"]
    counts = sorted((h["train"]["labelled_examples"], h["train"]["unlabelled_examples"]) for h in last.values())
    assert counts == [(0, 24), (24, 0), (24, 0)]
    assert len({frozenset(h["train"]) for h in last.values()}) == 1  # every reply, the same keys
    assert max(h["train"]["pseudo_labelled"] for h in last.values()) > 0


def test_partial_participation_trains_a_fraction_of_hospitals_each_round(tiny_config):
    run = run_simulation(tiny_config("federation.fraction_train=0.67", "federation.strategy=fedbn"))
    for record in read_metrics(run):
        assert sum("train" in h for h in record["hospitals"].values()) == 2
