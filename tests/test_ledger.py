"""Ledger mechanics, the canary bound and the leakage scanner, without a run."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from fedmed.audit.evidence import PartyLedger
from fedmed.audit.integrity import chain
from fedmed.audit.leakage import scan_value
from fedmed.errors import FedmedError
from fedmed.ledger.chain import LedgerFile, LedgerWriter
from fedmed.ledger.keys import Signer
from fedmed.privacy import canaries


def test_a_key_pair_is_created_once_readable_by_its_owner_only(tmp_path):
    first = Signer.load_or_create(tmp_path, "hospital-01")
    assert stat.S_IMODE(os.stat(tmp_path / "hospital-01.key").st_mode) == 0o600
    assert (tmp_path / "hospital-01.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert Signer.load_or_create(tmp_path, "hospital-01").key_id == first.key_id


def test_a_private_key_others_can_read_is_refused(tmp_path):
    Signer.load_or_create(tmp_path, "server")
    os.chmod(tmp_path / "server.key", 0o644)
    with pytest.raises(FedmedError, match="readable by others: `chmod 600"):
        Signer.load_or_create(tmp_path, "server")


def test_a_reopened_ledger_continues_its_chain(tmp_path):
    signer = Signer.load_or_create(tmp_path / "keys", "hospital-01")
    path = tmp_path / "run" / "hospital-01.jsonl"
    LedgerWriter(path, signer, "run").append("run-start", 1, {"x": 1})
    again = LedgerWriter(path, signer, "run")  # a new message, a new ClientApp
    again.append("train", 1, {"loss": float("nan"), "steps": 3})
    party = PartyLedger("hospital-01", LedgerFile.read(path), signer.public)
    assert chain(party) == []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in records] == [0, 1]
    assert records[1]["payload"]["loss"] is None  # JSON has no NaN
    assert again.checkpoint()["seq"] == 1


def test_the_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    m, r = 128, 64
    assert canaries.epsilon_lower_bound(m, r, r // 2, 1e-5) == 0.0
    bounds = [canaries.epsilon_lower_bound(m, r, v, 1e-5) for v in (48, 56, 60, 64)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert 2.0 < bounds[-1] < 5.8  # REFERENCE: at most about 5.8 even with m = 1000, all correct


def test_canaries_are_the_same_for_the_same_seed_and_half_are_included():
    a, b = canaries.make(7, 400, 32, 4), canaries.make(7, 400, 32, 4)
    assert np.array_equal(a.included, b.included) and bool((a.x == b.x).all())
    assert 150 < a.included.sum() < 250
    assert canaries.guesses(np.arange(4.0), np.array([False, False, True, True]), 1) == (2, 2)


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ({"reason": "cannot read C:\\Users\\radiology\\scan.dcm"}, "a file path"),
        ({"site": "BraTS2021_00495"}, "a patient identifier (BraTS case)"),
        ({"tag": "(0010,0010)"}, "a DICOM tag"),
        ({"x": "PatientBirthDate"}, "a DICOM attribute"),
        ({"img": [[0.5] * 32] * 32}, "an array of 1024 numbers"),
    ],
)
def test_the_scanner_finds_what_points_at_a_patient(value, what):
    assert any(what in f.message for f in scan_value(value, "x"))


def test_the_scanner_leaves_fedmed_s_own_records_alone(tmp_path):
    signer = Signer.load_or_create(tmp_path, "hospital-01")
    record = LedgerWriter(tmp_path / "l.jsonl", signer, "run").append(
        "train", 2, {"update_sha256": "ab" * 32, "metrics": {"label-counts": [3, 4], "eval-confusion": [1] * 16}, "reason": "privacy budget: 2.1 > 2"}
    )
    assert scan_value(record, "x") == []
    assert scan_value({"dir": "/home/me/runs", "name": "20261122-101010-federated"}, "config.toml") == []
