"""Heterogeneous hospitals: each partitioner's sizes and label sets, the minimum size,
determinism, composition, and the dealing of whole patients."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fedmed.config import SkewConfig
from fedmed.data import demo
from fedmed.data.skew import counts, deal, share_matrix
from fedmed.errors import FedmedError
from fedmed.run.heterogeneity import index as heterogeneity

SUPPLY = np.array([300, 300, 300, 300])


def sizes_and_classes(skew: SkewConfig, hospitals: int = 6, seed: int = 0):
    shares = share_matrix(skew, hospitals, SUPPLY, seed)
    table = counts(shares, SUPPLY)
    return table, table.sum(axis=1), (table > 0).sum(axis=1)


def test_iid_gives_every_hospital_the_same_share_of_every_class():
    table, sizes, held = sizes_and_classes(SkewConfig())
    assert (sizes == 200).all() and (held == 4).all()
    assert heterogeneity(table) == pytest.approx(0.0, abs=1e-9)


def test_dirichlet_label_skew_grows_as_beta_shrinks_and_is_seeded():
    mild, _, _ = sizes_and_classes(SkewConfig(labels="dirichlet", beta=100.0))
    harsh, sizes, _ = sizes_and_classes(SkewConfig(labels="dirichlet", beta=0.1))
    assert heterogeneity(mild) < 0.1 < heterogeneity(harsh)
    assert (harsh.sum(axis=0) == SUPPLY).all() and (sizes >= 8).all()  # every image used; min_size held
    again, _, _ = sizes_and_classes(SkewConfig(labels="dirichlet", beta=0.1))
    other, _, _ = sizes_and_classes(SkewConfig(labels="dirichlet", beta=0.1), seed=1)
    assert (again == harsh).all() and not (other == harsh).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_hospital_holds_exactly_k_classes(k):
    table, _, held = sizes_and_classes(SkewConfig(labels="classes", classes_per_hospital=k))
    assert (held == k).all()
    assert (table.sum(axis=0) == SUPPLY).all()  # 6 hospitals cover all 4 classes


def test_quantity_skew_by_dirichlet_and_power_law():
    _, sizes, held = sizes_and_classes(SkewConfig(quantity="dirichlet", quantity_beta=0.5))
    assert sizes.max() > 2 * sizes.min() and (held == 4).all() and (sizes >= 8).all()
    _, sizes, _ = sizes_and_classes(SkewConfig(quantity="power", power=1.0), hospitals=4)
    assert sorted(sizes.tolist()) == pytest.approx(sorted((1200 * np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12)).tolist()), abs=2)


def test_composed_label_and_quantity_skew():
    _, sizes, held = sizes_and_classes(SkewConfig(labels="classes", classes_per_hospital=2, quantity="power", power=1.5))
    assert (held == 2).all() and sizes.max() > 3 * sizes.min()


def test_minimum_size_is_guaranteed_or_refused():
    skew = SkewConfig(labels="dirichlet", beta=0.5, min_size=100)
    _, sizes, _ = sizes_and_classes(skew)
    assert (sizes >= 100).all()
    with pytest.raises(FedmedError, match="could not give every hospital 190"):
        sizes_and_classes(SkewConfig(labels="dirichlet", beta=0.05, min_size=190))
    with pytest.raises(FedmedError, match="cannot give 200 hospitals 8 each"):
        share_matrix(SkewConfig(labels="dirichlet"), 200, SUPPLY, 0)
    with pytest.raises(FedmedError, match="only 4 classes"):
        share_matrix(SkewConfig(labels="classes", classes_per_hospital=5), 3, SUPPLY, 0)


def test_dealing_keeps_patients_whole_and_follows_the_shares():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 5)  # 200 patients of 5 slices
    labels = np.repeat(rng.integers(0, 4, 200), 5)
    shares = share_matrix(SkewConfig(labels="classes", classes_per_hospital=1), 4, np.bincount(labels), 0)
    site = deal(groups, labels, shares, np.random.default_rng(1))
    for g in range(200):
        assert len(set(site[groups == g].tolist())) == 1
    for h in range(4):
        assert len(set(labels[site == h].tolist())) == 1  # #C=1: one class per hospital


def test_skewed_demo_hospitals_render_the_planned_labels(tmp_path):
    from fedmed import config as config_mod

    cfg = config_mod.load(
        None,
        ["data.image_size=32", "data.hospitals=3", "data.train_per_hospital=16", "data.test_per_hospital=8", "data.global_test_size=8",
         "skew.labels=classes", "skew.classes_per_hospital=2", "skew.min_size=4"],
    )
    spec = demo.DemoSpec.from_config(cfg.data, cfg.seed, cfg.skew)
    data = demo.generate(spec, workers=1)
    for h in range(3):
        got = np.bincount(data.select("train", h).labels, minlength=4)
        assert got.tolist() == list(spec.train_counts[h]) and np.count_nonzero(got) == 2
    assert demo.DemoSpec.from_config(cfg.data, cfg.seed, cfg.skew.model_copy(update={"labels": "iid"})).train_counts is None


def test_whole_patients_that_break_the_minimum_size_are_refused():
    from fedmed import config as config_mod
    from fedmed.data.dataset import Dataset
    from fedmed.data.partition import assign

    patient = np.repeat([0, 1, 2, 3], [50, 5, 5, 2])  # one big patient, two small, one for testing
    n = len(patient)
    ds = Dataset(
        images=np.zeros((n, 4, 4), np.uint8), labels=np.zeros(n, np.int64), split=(patient == 3).astype(np.int8),
        site=np.full(n, -1, np.int16), patient=patient.astype(np.int64), hashes=np.arange(1, n + 1, dtype=np.int64),
        manifest={"sites": []},
    )
    cfg = config_mod.load(None, ["data.source=disk", "data.path=/x", "data.hospitals=2", "skew.quantity=power", "skew.min_size=15"])
    with pytest.raises(FedmedError, match=r"dealt as whole patients, a hospital gets \d+ training images, under skew.min_size = 15"):
        assign(ds, cfg.data, cfg.skew, seed=0)


def test_scanner_settings_must_fit_the_data():
    from fedmed import config as config_mod

    with pytest.raises(FedmedError, match="skew.scanners = simulated re-acquires images on disk"):
        config_mod.load(None, ["skew.scanners=simulated"])
    with pytest.raises(FedmedError, match="applies to the demo data"):
        config_mod.load(None, ["skew.scanners=shared", "data.source=disk", "data.path=/x"])


def test_simulated_scanners_change_each_hospitals_images(tmp_path):
    from fedmed import config as config_mod
    from fedmed.data.sites import global_test, site_data
    from tests import mri_fixtures as fx

    fx.image_folder(tmp_path / "d", dict.fromkeys(["glioma", "meningioma", "notumor", "pituitary"], 12))
    base = ["data.source=disk", f"data.path='{tmp_path / 'd'}'", f"data.cache_dir='{tmp_path / 'c'}'", "data.image_size=32", "data.hospitals=2"]
    plain = site_data(config_mod.load(None, base), 0)
    shifted = site_data(config_mod.load(None, [*base, "skew.scanners=simulated"]), 0)
    assert torch_equal(plain.train.y, shifted.train.y) and not torch_equal(plain.train.x, shifted.train.x)
    assert len(global_test(config_mod.load(None, [*base, "skew.scanners=simulated"]))) == len(global_test(config_mod.load(None, base)))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_the_heterogeneity_report_of_thousands_of_hospitals_draws_and_prints(capsys):
    """Past LABELLED_ROWS the heatmap drops its row names (a 2,000-row figure would be
    taller than matplotlib draws); the terminal's table stops at TABLE_ROWS."""
    from PIL import Image
    from rich.console import Console

    from fedmed.run import heterogeneity as report

    rep = report.report({f"hospital-{i:04d}": [i % 5, 1, 2, 3] for i in range(2000)}, ("a", "b", "c", "d"))
    png = report.heatmap_png(rep)
    assert Image.open(io.BytesIO(png)).size[1] < 4000
    report.print_table(Console(width=120), rep)
    out = capsys.readouterr().out
    assert f"... {2000 - report.TABLE_ROWS} more" in out and "hospital-0031" not in out
