"""Differential privacy: calibration, accounting against an independent library, clipping,
and the settings that cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed import config as config_mod
from fedmed.errors import FedmedError
from fedmed.models import build_model
from fedmed.privacy.accounting import TOLERANCE, StepHistory, check_delta
from fedmed.privacy.client_level import ClientLevelDP
from fedmed.privacy.dpsgd import DPSGD, plan
from fedmed.training.loop import train

from .privacy_check import independent_epsilon


def cfg(*settings: str) -> config_mod.FedmedConfig:
    return config_mod.load(None, ["privacy.mode=sample", *settings])


@pytest.mark.parametrize(("kind", "tolerance"), [("rdp", 0.01), ("prv", 0.02)])
def test_step_history_epsilon_matches_dp_accounting(kind, tolerance):
    history = StepHistory(kind)
    for _ in range(20):  # 20 rounds of 13 steps, as a hospital would log them
        history.add(1.0, 1 / 13, 13)
    assert history.entries == [(1.0, 1 / 13, 260)]
    expected = independent_epsilon(kind, 1.0, 1 / 13, 260, 1e-5)
    assert history.epsilon(1e-5) == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_sigma_calibrated_for_the_whole_run_meets_the_target(kind):
    settings = cfg(f"privacy.accountant={kind}", "privacy.epsilon=4.0", "train.batch_size=16", "federation.rounds=12")
    p = plan(settings, n=200)
    assert p.planned_steps == 12 * 13 == 12 * len(range(0, 200, 16))
    history = StepHistory(kind)
    for _ in range(12):
        history.add(p.sigma, p.rate, p.steps_per_round)
    assert 4.0 - TOLERANCE - 0.05 <= history.epsilon(p.delta) <= 4.0
    one_round = StepHistory(kind, [(p.sigma, p.rate, p.steps_per_round)]).epsilon(p.delta)
    assert one_round < 4.0 / 2  # not calibrated per round


def test_delta_must_be_below_one_over_n():
    assert check_delta(0.0, 200, "images") == 1e-5
    assert check_delta(0.0, 3, "hospitals") == 1e-5
    with pytest.raises(FedmedError, match="not below 1/n"):
        check_delta(0.01, 200, "images")


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("privacy.epsilon=0", "`privacy.epsilon`"),
        ("privacy.epsilon=-1", "`privacy.epsilon`"),
        ("privacy.max_grad_norm=0", "`privacy.max_grad_norm`"),
        ("privacy.delta=1.0", "`privacy.delta`"),
        ("model.norm=batch", "set model.norm = group"),
        ('privacy.budgets="hospital-01"', "privacy.budgets expects"),
    ],
)
def test_settings_that_cannot_work_are_refused(setting, needle):
    with pytest.raises(FedmedError, match=needle):
        cfg(setting)


def test_batchnorm_is_fine_without_privacy():
    model = build_model(config_mod.load(None, ["model.norm=batch"]).model, 4, seed=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_dp_sgd_is_reproducible_only_when_asked():
    secret = cfg("train.batch_size=8", "privacy.accountant=rdp")
    x, y = _data()
    p = plan(secret, len(y))
    twice = []
    for _ in range(2):
        model = build_model(secret.model, 4, seed=0)
        train(model, x, y, secret.train, seed=1, private=DPSGD(p))
        twice.append(model.state_dict()["head.2.weight"])
    assert not torch.equal(*twice)  # noise and batches from the system's entropy, not the public seed


def test_dp_sgd_is_reproducible_and_noisy_in_simulation_mode():
    settings = cfg("train.batch_size=8", "privacy.accountant=rdp", "federation.rounds=2", "privacy.reproducible=true")
    x, y = _data()
    p = plan(settings, len(y))
    runs = []
    for seed in (1, 1, 2):
        model = build_model(settings.model, 4, seed=0)
        stats = train(model, x, y, settings.train, seed=seed, private=DPSGD(p))
        runs.append(model.state_dict())
        assert stats.steps == p.steps_per_round
        assert not any(hasattr(q, "grad_sample") for q in model.parameters())  # Opacus's hooks removed
    plain = build_model(settings.model, 4, seed=0)
    train(plain, x, y, settings.train, seed=1)
    key = "head.2.weight"
    assert torch.equal(runs[0][key], runs[1][key])
    assert not torch.equal(runs[0][key], runs[2][key])
    assert not torch.equal(runs[0][key], plain.state_dict()[key])


def test_fedprox_term_still_acts_under_dp():
    settings = cfg("train.batch_size=8", "privacy.accountant=rdp", "train.optimizer=sgd", "train.lr=0.5", "privacy.reproducible=true")
    x, y = _data()
    p = plan(settings, len(y))
    weights = []
    for mu in (0.0, 5.0):
        model = build_model(settings.model, 4, seed=0)
        train(model, x, y, settings.train, seed=3, proximal_mu=mu, private=DPSGD(p))
        weights.append(model.state_dict()["head.2.weight"])
    start = build_model(settings.model, 4, seed=0).state_dict()["head.2.weight"]
    assert (weights[1] - start).norm() < (weights[0] - start).norm()  # pulled back towards the start


def test_client_level_dp_clips_each_update_and_averages_unweighted():
    settings = config_mod.load(
        None, ["privacy.mode=client", "privacy.noise_multiplier=1e-9", "privacy.max_grad_norm=1.0", "data.hospitals=2"]
    )
    dp = ClientLevelDP(settings)
    start = {"w": np.zeros(3, dtype=np.float32), "steps": np.array(5, dtype=np.int64)}
    updated = [{"w": np.array([100.0, 0, 0], dtype=np.float32)}, {"w": np.array([0, 0.5, 0], dtype=np.float32)}]
    out = dp.aggregate(start, updated)
    assert np.allclose(out["w"], [0.5, 0.25, 0.0], atol=1e-6)  # (clip to 1, 0.5 as is) / 2 asked: not weighted
    assert np.allclose(dp.aggregate(start, updated[:1])["w"], [0.5, 0, 0], atol=1e-6)  # one missing: still / 2
    assert out["steps"] == 5
    assert dp.metrics()["steps"] == 2 and dp.metrics()["sample_rate"] == 1.0  # one release per call


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_both_models_take_a_private_step(name):
    settings = cfg(f"model.name={name}", "train.batch_size=4", "privacy.accountant=rdp", "privacy.delta=0.001")
    x, y = _data(8)
    model = build_model(settings.model, 4, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train(model, x, y, settings.train, seed=0, private=DPSGD(plan(settings, len(y))))
    assert stats.steps == 2 and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("in_channels", "stride"), [(1, 1), (1, 2), (4, 1)])
def test_per_image_conv_gradients_equal_autograd_one_image_at_a_time(in_channels, stride):
    from fedmed.privacy.dpsgd import _conv2d_grad_sample

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(in_channels, 6, 3, stride=stride, padding=1)
    x = torch.randn(5, in_channels, 16, 16)
    backprops = torch.randn_like(layer(x))
    got = _conv2d_grad_sample(layer, [x], backprops)
    for i in range(len(x)):
        layer.zero_grad()
        layer(x[i : i + 1]).backward(backprops[i : i + 1])
        assert torch.allclose(got[layer.weight][i], layer.weight.grad, atol=1e-4)
        assert torch.allclose(got[layer.bias][i], layer.bias.grad, atol=1e-4)


def test_the_plan_counts_the_steps_opacus_takes():
    settings = cfg("train.batch_size=1", "privacy.delta=0.001", "privacy.accountant=rdp")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(93, 1, 16, 16, generator=g), torch.randint(0, 4, (93,), generator=g)
    p = plan(settings, len(y))  # q = 1/93, and int(1 / q) == 92
    stats = train(build_model(settings.model, 4, seed=0), x, y, settings.train, seed=0, private=DPSGD(p))
    assert stats.steps == p.steps_per_round == 92
