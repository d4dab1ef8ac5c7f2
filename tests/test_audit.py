"""`fedmed audit` on real small runs: a clean run passes; each kind of tampering is
named, with the record that shows it."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from fedmed.errors import FedmedError
from fedmed.federation.simulation import run_simulation
from fedmed.ledger.chain import LedgerWriter, canonical, line_hash, signed_part
from fedmed.ledger.keys import Signer

from . import dishonest_client
from .auditing import CANARY_RUN, audit_of, dp_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean_run(dp_run) -> Path:
    """The session's DP run on Ray (3 hospitals, 3 rounds of DP-SGD, hospital-02's budget
    spent after round 1, so it declines round 2): the evidence every tampering test starts from."""
    return dp_run


@pytest.fixture
def run(clean_run, tmp_path) -> Path:
    """A private copy of the clean run, to tamper with."""
    return Path(shutil.copytree(clean_run, tmp_path / clean_run.name))


def _findings(report: dict, check: str) -> list[str]:
    return [f"{f['where']}: {f['message']}" for f in report["checks"][check]["findings"]]


def _ledger(run: Path, party: str) -> Path:
    return next((run / "ledgers").glob(f"*/{party}.jsonl"))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _index(path: Path, event: str) -> int:
    return next(i for i, line in enumerate(_lines(path)) if json.loads(line)["event"] == event)


def test_clean_run_passes_and_epsilon_recomputes_within_tolerance(clean_run, tmp_path):
    code, report = audit_of(clean_run, out_dir=tmp_path)
    assert code == 0, report["checks"]
    assert all(check["passed"] for check in report["checks"].values())
    assert set(report["parties"]) == {"server", "hospital-01", "hospital-02", "hospital-03"}
    assert report["privacy"]["hospital-02"]["steps"] < report["privacy"]["hospital-01"]["steps"]  # it declined
    for party, row in report["privacy"].items():  # the DP issue's tolerance for PRV against PLD
        assert row["recomputed_epsilon"] > 0
        assert row["claimed_epsilon"] == pytest.approx(row["recomputed_epsilon"], rel=0.02), party
    assert "# fedmed audit: PASSED" in (tmp_path / "audit.md").read_text()


def test_ledger_files_and_public_keys_from_a_deployment_pass(clean_run, tmp_path):
    files = sorted((clean_run / "ledgers").glob("*/*.jsonl")) + sorted((clean_run / "ledgers" / "keys").glob("*.pub"))
    code, report = audit_of(files, out_dir=tmp_path)
    assert code == 0, report["checks"]


def test_one_byte_changed_in_a_payload(run):
    path = _ledger(run, "hospital-02")
    lines = _lines(path)
    i = _index(path, "train")
    lines[i] = lines[i].replace(b'"train-accuracy":0.', b'"train-accuracy":1.', 1)
    assert lines[i] != _lines(path)[i]
    _write(path, lines)
    code, report = audit_of(run)
    assert code == 1
    found = _findings(report, "integrity")
    assert f"hospital-02.jsonl record {i} (train, round 1): signature does not verify: the record was altered after signing, or its signature replaced" in found
    assert any(f.startswith(f"hospital-02.jsonl record {i + 1}") and "the chain is broken here" in f for f in found)


def test_two_records_swapped(run):
    path = _ledger(run, "server")
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    code, report = audit_of(run)
    assert code == 1
    found = _findings(report, "integrity")
    assert any(f.startswith("server.jsonl record 1 ") and "carries sequence number 2 at position 1: records were deleted, inserted or reordered" in f for f in found)
    assert any(f.startswith("server.jsonl record 2 ") and "carries sequence number 1" in f for f in found)


def test_a_middle_record_deleted(run):
    path = _ledger(run, "hospital-01")
    lines = _lines(path)
    del lines[3]
    _write(path, lines)
    code, report = audit_of(run)
    assert code == 1
    assert any(f.startswith("hospital-01.jsonl record 3 ") and "carries sequence number 4 at position 3" in f for f in _findings(report, "integrity"))


def test_the_tail_truncated(run):
    hospital, server = _ledger(run, "hospital-03"), _ledger(run, "server")
    original, n, s = hospital.read_bytes(), len(_lines(hospital)), len(_lines(server))
    _write(hospital, _lines(hospital)[:-2])
    code, report = audit_of(run)
    assert code == 1
    assert any(f"hospital-03 signed a checkpoint at record {n - 1}, but hospital-03.jsonl has only {n - 2} records: it was truncated" in f for f in _findings(report, "checkpoints"))
    hospital.write_bytes(original)
    _write(server, _lines(server)[:-2])
    code, report = audit_of(run)
    assert code == 1
    found = _findings(report, "checkpoints")
    assert any(f.startswith(f"server.jsonl record {s - 3} ") and "does not end with run-end" in f for f in found)
    assert any(f.startswith(f"hospital-03.jsonl record {n - 1} ") and "covered by no checkpoint in the server's ledger" in f for f in found)


def test_a_signature_replaced(run):
    path = _ledger(run, "hospital-01")
    lines = _lines(path)
    records = [json.loads(line) for line in lines]
    records[2]["sig"] = records[1]["sig"]  # a real signature by the right key, of another record
    lines[2] = canonical(records[2])
    _write(path, lines)
    code, report = audit_of(run)
    assert code == 1
    assert any(f.startswith("hospital-01.jsonl record 2 ") and "signature does not verify" in f for f in _findings(report, "integrity"))


def test_a_record_re_signed_with_another_key(run, tmp_path):
    path = _ledger(run, "hospital-02")
    lines = _lines(path)
    record = json.loads(lines[2])
    intruder = Signer.load_or_create(tmp_path / "intruder", "hospital-02")
    record["key_id"] = intruder.key_id
    record["sig"] = base64.b64encode(intruder.sign(signed_part(record))).decode()
    lines[2] = canonical(record)
    _write(path, lines)
    code, report = audit_of(run)
    assert code == 1
    published = Signer.load_or_create(run / "ledgers" / "keys", "hospital-02").key_id
    assert any(
        f.startswith("hospital-02.jsonl record 2 ") and f"signed with key {intruder.key_id}, not hospital-02's published key {published}" in f
        for f in _findings(report, "integrity")
    )


def test_a_hospitals_claimed_epsilon_lowered_in_the_summary(run):
    summary = json.loads((run / "summary.json").read_text())
    row = summary["privacy"]["hospitals"]["hospital-02"]
    true = row["epsilon"]
    row["epsilon"] = round(true / 4, 3)
    (run / "summary.json").write_text(json.dumps(summary))
    code, report = audit_of(run)
    assert code == 1
    assert [f for f in _findings(report, "privacy") if f.startswith(f"summary.json: reports epsilon {true / 4:.3f} for hospital-02; its ledger's parameters give ")]


def test_a_hospital_rewriting_its_own_ledger_with_a_lower_epsilon(run):
    """Even re-signed with the hospital's own key: the server's checkpoints and the
    recomputation both show it."""
    path = _ledger(run, "hospital-02")
    signer = Signer.load_or_create(run / "ledgers" / "keys", "hospital-02")
    lines = _lines(path)
    last_train = max(i for i, line in enumerate(lines) if json.loads(line)["event"] == "train")
    record = json.loads(lines[last_train])
    record["payload"]["privacy"]["epsilon"] = 0.5
    for i in range(last_train, len(lines)):  # re-chain and re-sign from the edit on
        r = record if i == last_train else json.loads(lines[i])
        r["prev"] = line_hash(lines[i - 1])
        r["sig"] = base64.b64encode(signer.sign(signed_part(r))).decode()
        lines[i] = canonical(r)
    _write(path, lines)
    code, report = audit_of(run)
    assert code == 1
    assert report["checks"]["integrity"]["passed"]
    assert any(f"hospital-02 claims epsilon 0.500; its logged parameters give {report['privacy']['hospital-02']['recomputed_epsilon']:.3f}" in f for f in _findings(report, "privacy"))
    assert any("hospital-02's checkpoint at record" in f and "the ledger was changed or forked" in f for f in _findings(report, "checkpoints"))


def test_a_planted_path_and_patient_id_in_the_metrics(run):
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"round": n, "note": "worst image /data/hospital-02/Training/glioma/Tr-gl_0042.jpg"}) + "\n")
        handle.write(json.dumps({"round": n, "hardest": "patient 004217"}) + "\n")
    code, report = audit_of(run)
    assert code == 1
    found = _findings(report, "leakage")
    assert any(f.startswith(f"metrics.jsonl line {n + 1}: `note` holds a file path") for f in found)
    assert any(f.startswith(f"metrics.jsonl line {n + 1}: `note` holds an image file name") for f in found)
    assert any(f.startswith(f"metrics.jsonl line {n + 2}: `hardest` holds a patient identifier") for f in found)
    assert "004217" not in json.dumps(report)  # the audit does not repeat the identifier whole


def test_a_torn_last_line_is_reported_and_never_appended_to(run):
    path = _ledger(run, "hospital-01")
    with path.open("ab") as handle:
        handle.write(b'{"event":"train","key_id"')
    code, report = audit_of(run)
    assert code == 1
    assert any("incomplete last line (25 bytes): a torn write" in f for f in _findings(report, "integrity"))
    signer = Signer.load_or_create(run / "ledgers" / "keys", "hospital-01")
    with pytest.raises(FedmedError, match="ends with an incomplete record"):
        LedgerWriter(path, signer, "run")
    assert path.read_bytes().endswith(b'"key_id"')  # kept as it was


def test_a_replaced_final_model(run):
    import torch

    state = torch.load(run / "model.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    torch.save(state, run / "model.pt")
    code, report = audit_of(run)
    assert code == 1
    assert "model.pt: is not the final model the server's ledger recorded (final_model_sha256)" in _findings(report, "consistency")


def test_empirical_audit_catches_a_hospital_training_without_the_noise_it_logs(cache_dir, ray_head, tmp_path):
    """Canaries at hospital-01; every hospital clips and samples but adds no noise, and logs
    the sigma for epsilon 1 (a real Ray simulation). Chains, checkpoints and the
    recomputation all hold; the canaries do not."""
    cfg = dp_config(cache_dir, tmp_path, f"simulation.ray_address='{ray_head.address}'", *CANARY_RUN)
    code, report = audit_of(run_simulation(cfg, client_app=dishonest_client.app), empirical=True)
    assert code == 1
    assert [name for name, check in report["checks"].items() if not check["passed"]] == ["empirical"]
    assert report["empirical"]["claimed_epsilon"] == pytest.approx(1.0, abs=0.03)
    assert report["empirical"]["epsilon_lower_bound"] > 1.0


def test_reported_results_that_differ_from_the_ledgers(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records[-1]["hospitals"]["hospital-03"]["eval"]["accuracy"] = 0.99
    last = records[-1]["round"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = json.loads((run / "summary.json").read_text())
    summary["test"]["accuracy"] = 0.99
    (run / "summary.json").write_text(json.dumps(summary))
    code, report = audit_of(run)
    assert code == 1
    found = _findings(report, "consistency")
    assert f"metrics.jsonl line {len(records)}: hospital-03's eval figures in round {last} (accuracy) are not those its ledger recorded" in found
    assert any(f.startswith("summary.json: reports test accuracy 0.99; the server's ledger recorded ") for f in found)
