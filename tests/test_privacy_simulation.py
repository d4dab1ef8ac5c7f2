"""Differential privacy in real simulations (Ray, Flower apps, Opacus): each hospital's
epsilon composes over its rounds and matches an independent recomputation; budgets
are enforced by the hospitals; client-level DP is accounted at the server."""

from __future__ import annotations

import json

import pytest

from fedmed.federation.simulation import run_simulation
from fedmed.outputs import read_metrics
from fedmed.privacy.accounting import Ledger
from fedmed.privacy.dpsgd import plan

from .privacy_check import independent_epsilon

pytestmark = pytest.mark.slow
TOLERANCE = {"rdp": 0.01, "prv": 0.02}


def _between_first_and_second_round(cfg) -> float:
    p = plan(cfg, cfg.data.train_per_hospital)
    one = Ledger(p.accountant, [(p.sigma, p.rate, p.steps_per_round)]).epsilon(p.delta)
    two = Ledger(p.accountant, [(p.sigma, p.rate, 2 * p.steps_per_round)]).epsilon(p.delta)
    return round((one + two) / 2, 3)


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_hospitals_report_epsilon_composed_over_every_round(tiny_config, kind):
    settings = ["privacy.mode=sample", f"privacy.accountant={kind}", "privacy.epsilon=6", "federation.rounds=3"]
    if kind == "rdp":
        settings.append("federation.strategy=fedbn")  # DP with FedBN's local layers
    cfg = tiny_config(*settings)
    if kind == "prv":  # hospital-02 can afford one round only
        cfg = tiny_config(*settings, f'privacy.budgets="hospital-02={_between_first_and_second_round(cfg)}"')
    run = run_simulation(cfg)
    rounds = read_metrics(run)
    assert len(rounds) == 3
    for record in rounds:
        for site, phases in record["hospitals"].items():
            if "train" not in phases:
                continue
            t = phases["train"]
            assert t["dp_steps"] == record["round"] * t["steps"] or site == "hospital-02"  # the ledger persists
            expected = independent_epsilon(kind, t["dp_sigma"], t["dp_sample_rate"], int(t["dp_steps"]), t["dp_delta"])
            assert t["dp_epsilon"] == pytest.approx(expected, rel=TOLERANCE[kind])
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    assert 0 < privacy["max_epsilon"] <= 6.0
    if kind == "rdp":
        assert {r["rounds_trained"] for r in privacy["hospitals"].values()} == {3}
        assert all(h["train"]["local_arrays_restored"] > 0 for h in rounds[1]["hospitals"].values())
    else:
        declined = privacy["hospitals"]["hospital-02"]
        assert declined["rounds_trained"] == 1 and declined["declined"]["round"] == 2
        assert "privacy budget" in declined["declined"]["reason"]
        assert rounds[1]["declined"] == ["hospital-02"]
        assert "train" not in rounds[2]["hospitals"].get("hospital-02", {})
        assert privacy["hospitals"]["hospital-01"]["rounds_trained"] == 3  # the others went on


def test_client_level_dp_is_accounted_at_the_server(tiny_config):
    run = run_simulation(tiny_config("privacy.mode=client", "privacy.epsilon=20", "federation.rounds=2"))
    federation = json.loads((run / "summary.json").read_text())["privacy"]["federation"]
    assert federation["steps"] == 2 and federation["epsilon"] <= 20
    expected = independent_epsilon("prv", federation["sigma"], 1.0, 2, federation["delta"])
    assert federation["epsilon"] == pytest.approx(expected, rel=0.02)
    assert [r["privacy"]["steps"] for r in read_metrics(run)] == [1, 2]
