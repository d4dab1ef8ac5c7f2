"""`fedmed audit` on runs of the federation logic in this process (tests/inprocess.py):
runs of other shapes than test_audit.py's Ray run, and input it cannot audit."""

from __future__ import annotations

import pytest

from . import dishonest_client
from .auditing import CANARY_RUN, audit_of, dp_config
from .conftest import assert_clean_failure, fedmed
from .inprocess import run_in_process


def test_unusable_input_exits_2_with_one_line(tmp_path):
    assert_clean_failure(fedmed("audit", str(tmp_path)), "has no ledgers/ folder")


def test_empirical_audit_passes_a_hospital_that_adds_the_noise_it_logs(cache_dir, tmp_path):
    code, report = audit_of(run_in_process(dp_config(cache_dir, tmp_path, *CANARY_RUN)), empirical=True)
    assert code == 0, report["checks"]
    assert report["empirical"]["epsilon_lower_bound"] <= report["empirical"]["claimed_epsilon"]


def test_empirical_audit_catches_a_hospital_training_without_the_noise_it_logs(cache_dir, tmp_path):
    """Canaries at hospital-01; every hospital clips and samples but adds no noise, and logs
    the sigma for epsilon 1 (the federation in-process; its honest twin is above). Chains,
    checkpoints and the recomputation all hold; the canaries do not."""
    code, report = audit_of(run_in_process(dp_config(cache_dir, tmp_path, *CANARY_RUN), client_app=dishonest_client.app), empirical=True)
    assert code == 1
    assert [name for name, check in report["checks"].items() if not check["passed"]] == ["empirical"]
    assert report["empirical"]["claimed_epsilon"] == pytest.approx(1.0, abs=0.03)
    assert report["empirical"]["epsilon_lower_bound"] > 1.0


def test_a_run_of_another_shape_passes(cache_dir, tmp_path):
    """Two of three hospitals a round, FedAdam (its aggregate is not recomputed), no DP,
    no federated evaluation."""
    settings = ("privacy.mode=off", "federation.fraction_train=0.67", "federation.strategy=fedadam", "federation.fraction_evaluate=0.0")
    code, report = audit_of(run_in_process(dp_config(cache_dir, tmp_path, *settings)))
    assert code == 0, report["checks"]
    assert report["privacy"] == {}
