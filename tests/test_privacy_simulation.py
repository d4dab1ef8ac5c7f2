"""Sample-level DP in a real Ray simulation (the session's `dp_run`: Flower apps, Opacus):
each hospital's epsilon composes over its rounds and matches an independent
recomputation; a budget is enforced by the hospital itself."""

from __future__ import annotations

import pytest

from fedmed.run.directory import RunDirectory

from .privacy_check import independent_epsilon

pytestmark = pytest.mark.slow


def test_hospitals_report_epsilon_composed_over_every_round(dp_run):
    for record in RunDirectory(dp_run).rounds():
        for site, phases in record["hospitals"].items():
            if "train" not in phases:
                continue
            t = phases["train"]
            assert t["dp_steps"] == record["round"] * t["steps"] or site == "hospital-02"  # the step history persists
            expected = independent_epsilon("prv", t["dp_sigma"], t["dp_sample_rate"], int(t["dp_steps"]), t["dp_delta"])
            assert t["dp_epsilon"] == pytest.approx(expected, rel=0.02)
    privacy = RunDirectory(dp_run).summary()["privacy"]
    assert 5.0 < privacy["max_epsilon"] <= 6.0  # the planned run's target, spent by those that trained every round
    assert privacy["hospitals"]["hospital-01"]["rounds_trained"] == 3


def test_a_hospital_declines_a_round_its_budget_cannot_afford_and_the_others_go_on(dp_run):
    records = RunDirectory(dp_run).rounds()
    declined = RunDirectory(dp_run).summary()["privacy"]["hospitals"]["hospital-02"]
    assert declined["rounds_trained"] == 1 and declined["declined"]["round"] == 2
    assert "privacy budget" in declined["declined"]["reason"]
    assert declined["epsilon"] <= declined["budget"]
    assert records[1]["declined"] == ["hospital-02"] and "privacy budget" in records[1]["declined_reasons"]["hospital-02"]
    assert records[2]["declined"] == []  # not asked again (asked, it would decline again)
    assert [sorted(s for s, h in r["hospitals"].items() if "train" in h) for r in records[1:]] == [["hospital-01", "hospital-03"]] * 2
