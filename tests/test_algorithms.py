"""The aggregation rules, SCAFFOLD, the attacks, Ditto and the learning-rate schedule on
toy inputs, against computations by hand. `aggregation.replay` runs the same strategy
objects the server does (and the audit replays rounds with)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmed.config import load
from fedmed.errors import FedmedError
from fedmed.federation import attack
from fedmed.federation.aggregation import Saved, replay
from fedmed.training import personal, scaffold
from fedmed.training.schedule import lr_at

from .inprocess import one_thread


def _cfg(*settings: str):
    return load(None, ["data.hospitals=5", *settings])


def _updates(values: list[list[float]], weights: list[int] | None = None) -> list[Saved]:
    weights = weights or [1] * len(values)
    return [Saved(f"hospital-{i + 1:02d}", {"w": np.asarray(v, dtype=np.float32)}, w) for i, (v, w) in enumerate(zip(values, weights, strict=True))]


SENT = {"w": np.zeros(2, dtype=np.float32)}


def test_fedavg_weights_by_examples():
    out = replay(_cfg(), 1, SENT, _updates([[0, 0], [3, 6]], [1, 2]), {})
    np.testing.assert_allclose(out.new["w"], [2.0, 4.0])


def test_median_is_coordinate_wise():
    out = replay(_cfg("federation.strategy=median"), 1, SENT, _updates([[1, 50], [2, -1], [100, 3]]), {})
    np.testing.assert_allclose(out.new["w"], [2.0, 3.0])


def test_trimmed_mean_cuts_the_extremes_of_each_coordinate():
    # beta 0.2 of 5 cuts one value at each end, coordinate by coordinate; weights are ignored
    values = [[1, 10], [2, 20], [3, 30], [4, 40], [1000, -1000]]
    out = replay(_cfg("federation.strategy=trimmed_mean", "federation.trim_fraction=0.2"), 1, SENT, _updates(values, [9, 1, 1, 1, 1]), {})
    np.testing.assert_allclose(out.new["w"], [(2 + 3 + 4) / 3, (10 + 20 + 30) / 3])


def test_krum_keeps_the_update_closest_to_its_neighbours():
    # n = 5, f = 1: each scores the sum of squared distances to its n - f - 2 = 2 nearest
    values = [[0, 0], [1, 0], [0, 1], [3, 3], [10, 10]]
    out = replay(_cfg("federation.strategy=krum", "federation.byzantine=1"), 1, SENT, _updates(values), {})
    # scores: (0,0) 1 + 1 = 2; (1,0) and (0,1) 1 + 2 = 3; (3,3) 13 + 13; (10,10) far more
    assert out.selected == ["hospital-01"]
    np.testing.assert_allclose(out.new["w"], [0.0, 0.0])


def test_multi_krum_averages_the_best_scored_updates():
    values = [[0, 0], [2, 0], [0, 2], [9, 9], [-9, 9]]
    out = replay(_cfg("federation.strategy=multikrum", "federation.byzantine=1", "federation.krum_select=3"), 1, SENT, _updates(values), {})
    assert out.selected == ["hospital-01", "hospital-02", "hospital-03"]
    np.testing.assert_allclose(out.new["w"], [2 / 3, 2 / 3], rtol=1e-6)


def test_bulyan_selects_by_krum_then_averages_the_values_closest_to_the_median():
    # n = 7, f = 1: Krum keeps theta = n - 2f = 5, then per coordinate the beta = theta - 2f = 3 closest to their median
    values = [[0.0], [1.0], [2.0], [3.0], [4.0], [50.0], [-60.0]]
    cfg = load(None, ["data.hospitals=7", "federation.strategy=bulyan", "federation.byzantine=1"])
    out = replay(cfg, 1, {"w": np.zeros(1, dtype=np.float32)}, _updates(values), {})
    assert out.selected == ["hospital-01", "hospital-02", "hospital-03", "hospital-04", "hospital-05"]
    np.testing.assert_allclose(out.new["w"], [2.0])  # median 2 of 0..4; closest three: 1, 2, 3


def test_fedavgm_carries_momentum_across_rounds():
    cfg = _cfg("federation.strategy=fedavgm", "federation.server_momentum=0.5")
    first = replay(cfg, 1, SENT, _updates([[1, 1]]), {})  # pseudo-gradient -1: v = -1, w = 0 + 1
    np.testing.assert_allclose(first.new["w"], [1.0, 1.0])
    second = replay(cfg, 2, first.new, _updates([[2, 2]]), first.state)  # gradient -1: v = 0.5 (-1) - 1 = -1.5
    np.testing.assert_allclose(second.new["w"], [2.5, 2.5])


def test_scaffold_server_moves_the_model_by_the_weighted_mean_and_the_control_by_s_over_n():
    cfg = _cfg("federation.strategy=scaffold", "train.optimizer=sgd", "train.momentum=0")  # 5 hospitals, server lr 1
    updates = [
        Saved("hospital-01", {"w": np.asarray([1.0, 0.0], np.float32)}, 1, {"w": np.asarray([1.0, 2.0], np.float32)}),
        Saved("hospital-02", {"w": np.asarray([4.0, 3.0], np.float32)}, 2, {"w": np.asarray([3.0, 0.0], np.float32)}),
    ]
    out = replay(cfg, 1, SENT, updates, {"control": {"w": np.asarray([1.0, 1.0], np.float32)}})
    np.testing.assert_allclose(out.new["w"], [3.0, 2.0])
    # c + |S|/N mean(dc) = 1 + 2/5 * (2, 1)
    np.testing.assert_allclose(out.state["control"]["w"], [1.8, 1.4], rtol=1e-6)


def test_scaffold_hospital_variate_follows_option_two():
    model = nn.Linear(1, 1, bias=False)
    start = {"weight": torch.tensor([[1.0]])}
    with torch.no_grad():
        model.weight.fill_(0.4)  # y after K = 3 steps of lr 0.1
    server, own = {"weight": torch.tensor([[0.5]])}, {"weight": torch.tensor([[0.2]])}
    new, change = scaffold.step(model, start, server, own, steps=3, lr=0.1)
    # c_i+ = c_i - c + (x - y) / (K lr) = 0.2 - 0.5 + 0.6 / 0.3 = 1.7
    assert new["weight"].item() == pytest.approx(1.7)
    assert change["weight"].item() == pytest.approx(1.5)
    assert scaffold.correction(model, server, own)["weight"].item() == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("sign_flip", [-1.0, 1.0]), ("scale", [21.0, 1.0]), ("free_rider", [1.0, 1.0])],
)
def test_each_attack_changes_the_update_as_specified(kind, expected):
    a = load(None, [f"attack.kind={kind}", "attack.factor=10"]).attack
    received, trained = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 1.0])}
    assert attack.tamper(a, received, trained, seed=0)["w"].tolist() == expected


def test_the_gaussian_attack_sends_the_received_model_plus_seeded_noise():
    a = load(None, ["attack.kind=gaussian", "attack.std=2"]).attack
    received, trained = {"w": torch.zeros(20000)}, {"w": torch.ones(20000)}
    sent = attack.tamper(a, received, trained, seed=3)["w"]
    assert sent.std().item() == pytest.approx(2.0, rel=0.03) and abs(sent.mean().item()) < 0.05
    assert torch.equal(sent, attack.tamper(a, received, trained, seed=3)["w"])


def test_label_flip_reverses_classes_and_keeps_unknown_labels():
    assert attack.flip_labels(torch.tensor([0, 1, 2, 3, -1]), 4).tolist() == [3, 2, 1, 0, -1]


def test_attackers_are_drawn_from_the_seed_or_named():
    drawn = attack.attackers(load(None, ["attack.kind=scale", "attack.hospitals=2", "seed=5"]))
    assert len(drawn) == 2 and drawn == attack.attackers(load(None, ["attack.kind=scale", "attack.hospitals=2", "seed=5"]))
    assert attack.attackers(load(None, ["attack.kind=scale", 'attack.hospitals="hospital-03"'])) == ["hospital-03"]
    with pytest.raises(FedmedError, match="hospital-99, not a hospital of this run"):
        attack.attackers(load(None, ["attack.kind=scale", 'attack.hospitals="hospital-99"']))


def test_dittos_personal_model_is_pulled_towards_the_global_one():
    """With lambda the personal model ends between its own optimum and the global model;
    with a huge lambda it stays at the global model."""
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 4, (32,))
    cfg = load(None, ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0", "train.augment=false", "train.batch_size=16", "model.width=4"])
    from fedmed.models import build_model

    base = build_model(cfg.model, 4, seed=0)
    glob = {k: v.clone() for k, v in base.state_dict().items()}

    def distance(lam: float) -> float:
        model = build_model(cfg.model, 4, seed=1)  # a personal model away from the global one
        with one_thread():
            personal.ditto(model, glob, x, y, cfg.train, epochs=2, lam=lam, seed=0)
        return sum(float(((p.detach() - glob[n]) ** 2).sum()) for n, p in model.named_parameters())

    free, pulled = distance(0.0), distance(5.0)
    assert pulled < free  # the proximal term pulls
    assert pulled > 0  # and the personal model still differs from the global one


@pytest.mark.parametrize(
    ("settings", "lrs"),
    [
        ([], [0.1, 0.1, 0.1, 0.1, 0.1]),
        (["train.schedule=cosine", "train.lr_min=0.0"], [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]),
        (["train.schedule=step", "train.step_rounds=2", "train.step_gamma=0.5"], [0.1, 0.1, 0.05, 0.05, 0.025]),
    ],
)
def test_the_learning_rate_schedule(settings, lrs):
    train = load(None, ["train.lr=0.1", *settings]).train
    assert [lr_at(train, r, 5) for r in range(1, 6)] == pytest.approx(lrs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["data.hospitals=4", "federation.strategy=krum"], "needs at least 5 hospitals a round \\(more than 2f \\+ 2.*\\); this run asks 4"),
        (["data.hospitals=8", "federation.strategy=bulyan", "federation.byzantine=2"], "needs at least 11 hospitals a round \\(more than 4f \\+ 2"),
        (["data.hospitals=8", "federation.strategy=multikrum", "federation.krum_select=8"], "krum_select = 8 averages more updates than the 7"),
        (["data.hospitals=4", "federation.strategy=trimmed_mean"], "cuts no hospital of the 4 asked a round: raise it to at least 0.25"),
        (["federation.strategy=scaffold"], "set train.optimizer = sgd"),
        (["personal.method=ditto", "privacy.mode=sample"], "outside DP's accounting"),
        (["attack.kind=scale", "attack.hospitals=9"], "between 1 and data.hospitals \\(8\\)"),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(settings, message):
    with pytest.raises(FedmedError, match=message):
        load(None, settings)
