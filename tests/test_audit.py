"""`fedmed audit` on real small runs: a clean run passes; each kind of tampering is
named, with the record that shows it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from fedmed.audit.evidence import AuditInputError
from fedmed.errors import FedmedError
from fedmed.ledger.chain import LedgerWriter, canonical, checkpoint_body, line_hash, signed_part
from fedmed.ledger.keys import KeyStore, Signer, default_key_store, fingerprint, read_trusted

from .auditing import audit_of

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


def _own_key(party: str) -> Signer:
    """The party's signing key, in the tests' key store (never in the run directory)."""
    return KeyStore(default_key_store()).signer(party)


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
    """The public keys as the parties hand them over (here: the key store's, the run's own
    copies being no evidence)."""
    keys = sorted(Path(os.environ["FEDMED_KEY_STORE"]).glob("*.pub"))
    files = sorted((clean_run / "ledgers").glob("*/*.jsonl")) + keys
    code, report = audit_of(files, out_dir=tmp_path)
    assert code == 0, report["checks"]


def test_the_runs_own_key_copies_named_to_the_audit_are_not_trusted(clean_run, tmp_path):
    copies = sorted((clean_run / "ledgers" / "keys").glob("*.pub"))
    code, report = audit_of([*sorted((clean_run / "ledgers").glob("*/*.jsonl")), *copies], out_dir=tmp_path)
    assert (code, report["verdict"]) == (1, "NOT VERIFIED")
    assert all(k["trusted_from"] is None for k in report["keys"].values())
    with pytest.raises(AuditInputError, match="is a run directory's own copy of a key"):
        audit_of(clean_run, keys=[clean_run / "ledgers" / "keys" / "server.pub"], out_dir=tmp_path)


def test_the_same_key_from_a_trust_file_and_a_pub_file_is_one_key(clean_run, tmp_path):
    store = Path(os.environ["FEDMED_KEY_STORE"])
    run_id = next((clean_run / "ledgers").glob("*/server.jsonl")).parent.name
    code, report = audit_of(clean_run, keys=[store / "runs" / f"{run_id}.toml", store / "server.pub"], out_dir=tmp_path)
    assert (code, report["verdict"]) == (0, "PASSED"), report["checks"]


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
    _write(server, _lines(server)[:-4])  # its last evaluate-round, round-record, reported and run-end
    code, report = audit_of(run)
    assert code == 1
    found = _findings(report, "checkpoints")
    assert any(f.startswith(f"server.jsonl record {s - 5} ") and "does not end with run-end" in f for f in found)
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
    published = report["keys"]["hospital-02"]["key_id"]
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
    signer = _own_key("hospital-02")
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
    signer = _own_key("hospital-01")
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


# ---- keys from outside the run, and the figures it reports ------------------------------


def test_no_private_key_or_data_secret_is_written_into_the_run_directory(clean_run):
    written = {p.name for p in clean_run.rglob("*") if p.is_file()}
    assert not [n for n in written if n.endswith((".key", ".data-secret"))]
    assert {"server.pub", "hospital-01.pub"} <= written  # the public keys' convenience copies


def _forge(run: Path, edit) -> None:
    """Whoever holds only the run directory: every ledger re-signed with fresh keys (their
    chains, and the checkpoints each party recorded of the others, rewritten to match), the
    run's public keys replaced. `edit(party, record)` changes records first."""
    keys = {p.stem: Signer.load_or_create(run.parent / "forger", p.stem) for p in (run / "ledgers").glob("*/*.jsonl")}
    files = {party: _ledger(run, party) for party in keys}
    old = {party: [json.loads(line) for line in _lines(path)] for party, path in files.items()}
    new: dict[tuple[str, int], bytes] = {}

    def resign_checkpoints(value):
        if isinstance(value, dict) and {"party", "run", "seq", "head", "key_id", "sig"} <= set(value):
            signer = keys[value["party"]]
            body = {**value, "head": line_hash(line_of(value["party"], int(value["seq"]))), "key_id": signer.key_id}
            return {**body, "sig": base64.b64encode(signer.sign(checkpoint_body(body))).decode()}
        if isinstance(value, dict):
            return {k: resign_checkpoints(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resign_checkpoints(v) for v in value]
        return value

    def line_of(party: str, seq: int) -> bytes:  # checkpoints point back in time: no cycles
        if (party, seq) not in new:
            record = dict(old[party][seq])
            edit(party, record)
            record["payload"] = resign_checkpoints(record["payload"])
            record["prev"] = line_hash(line_of(party, seq - 1)) if seq else record["prev"]
            record["key_id"] = keys[party].key_id
            record["sig"] = base64.b64encode(keys[party].sign(signed_part(record))).decode()
            new[party, seq] = canonical(record)
        return new[party, seq]

    for party, path in files.items():
        _write(path, [line_of(party, i) for i in range(len(old[party]))])
        shutil.copy(run.parent / "forger" / f"{party}.pub", run / "ledgers" / "keys" / f"{party}.pub")


def _final_accuracy_raised(run: Path):
    """The issue's forgery: the final test accuracy raised to 0.9, in the summary and in
    every record that states it."""
    summary = json.loads((run / "summary.json").read_text())
    summary["test"]["accuracy"] = 0.9
    (run / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    digest = hashlib.sha256((run / "summary.json").read_bytes()).hexdigest()

    def edit(party: str, record: dict) -> None:
        if party == "server" and record["event"] == "run-end":
            record["payload"] = {**record["payload"], "test_accuracy": 0.9}
        if party == "server" and record["event"] == "reported":
            files = {**record["payload"]["files"], "summary": digest}
            record["payload"] = {**record["payload"], "files": files, "figures": {**record["payload"]["figures"], "summary": summary}}

    return edit


def test_a_run_forged_with_fresh_keys_fails_against_the_keys_the_run_was_made_with(run):
    _forge(run, _final_accuracy_raised(run))
    code, report = audit_of(run)  # this machine's key store holds the run's trust file
    assert code == 1 and report["verdict"] == "FAILED"
    assert "ledgers/keys/server.pub: is not the key trusted for server (this machine's key store" in "\n".join(_findings(report, "keys"))
    assert report["keys"]["server"]["trusted_from"].startswith("this machine's key store")


def test_a_forged_run_audited_elsewhere_is_not_verified_without_keys_and_fails_with_them(run, tmp_path, monkeypatch):
    trust = next(Path(default_key_store(), "runs").glob(f"{_ledger(run, 'server').parent.name}.toml"))
    _forge(run, _final_accuracy_raised(run))
    monkeypatch.setenv("FEDMED_KEY_STORE", str(tmp_path / "another-machine"))
    code, report = audit_of(run)
    assert code == 1 and report["verdict"] == "NOT VERIFIED"  # otherwise a flawless forgery
    assert [name for name, check in report["checks"].items() if not check["passed"]] == ["keys"]
    assert report["keys"]["server"]["trusted_from"] is None
    code, report = audit_of(run, keys=[trust])
    assert code == 1 and report["verdict"] == "FAILED"
    assert report["keys"]["server"]["trusted_from"] == f"--keys {trust}"
    assert not report["checks"]["integrity"]["passed"]  # checked against the trusted keys


def test_the_clean_run_passes_with_its_trust_file_or_the_server_fingerprint(clean_run, tmp_path, monkeypatch):
    server = _ledger(clean_run, "server")
    trust = Path(default_key_store(), "runs", f"{server.parent.name}.toml")
    monkeypatch.setenv("FEDMED_KEY_STORE", str(tmp_path / "another-machine"))
    code, report = audit_of(clean_run, keys=[trust], out_dir=tmp_path / "a")
    assert code == 0 and report["verdict"] == "PASSED"
    written_down = tmp_path / "fingerprints.toml"  # what an operator copied from the trust file
    fingerprints = {p: fingerprint(k.public) for k in read_trusted(trust) for p in [k.party]}
    written_down.write_text("[keys]\n" + "".join(f'"{p}" = "{f}"\n' for p, f in fingerprints.items()))
    code, report = audit_of(clean_run, keys=[written_down], out_dir=tmp_path / "b")
    assert code == 0, report["checks"]["keys"]


@pytest.mark.parametrize(
    ("file", "change", "expected"),
    [
        ("metrics.jsonl", "global accuracy", "metrics.jsonl round 3: differs from what the server signed: test.accuracy is 0.99"),
        ("metrics.jsonl", "federated figure", "metrics.jsonl round 3: differs from what the server signed: federated_eval.macro_f1 is 0.99"),
        ("metrics.jsonl", "deleted", "metrics.jsonl: is missing: the server signed 3 round records"),
        ("metrics.jsonl", "a forged line first", "metrics.jsonl round 3: appears 2 times"),
        ("metrics.jsonl", "a line without its end", "metrics.jsonl: ends with an incomplete line"),
        ("summary.json", "macro-F1", "summary.json: differs from what the server signed: test.macro_f1 is 0.99"),
        ("summary.json", "per-hospital", "summary.json: differs from what the server signed: per_hospital.hospital-01.accuracy is 0.99"),
        ("summary.json", "deleted", "summary.json: was deleted: the server signed its digest"),
        ("heterogeneity.json", "index", "heterogeneity.json: differs from what the server signed: index is 0.99"),
        ("model.pt", "deleted", "model.pt: was deleted: the server signed its digest"),
    ],
)
def test_every_reported_figure_is_bound_to_the_signed_ledger(run, file, change, expected):
    path = run / file
    if change == "deleted":
        path.unlink()
    elif change == "a forged line first":  # readers that keep a round's last line would not see it
        forged = json.loads(path.read_text().splitlines()[-1])
        forged["test"]["accuracy"] = 0.99
        path.write_text(json.dumps(forged, sort_keys=True) + "\n" + path.read_text())
    elif change == "a line without its end":
        path.write_text(path.read_text() + '{"round": 4, "test": {"accuracy": 0.99}}')
    elif file == "metrics.jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        target = records[-1]["test"] if change == "global accuracy" else records[-1]["federated_eval"]
        target["accuracy" if change == "global accuracy" else "macro_f1"] = 0.99
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    else:
        figures = json.loads(path.read_text())
        target = figures["test"] if change == "macro-F1" else figures["per_hospital"]["hospital-01"] if change == "per-hospital" else figures
        target["macro_f1" if change == "macro-F1" else "accuracy" if change == "per-hospital" else "index"] = 0.99
        path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    code, report = audit_of(run)
    assert code == 1
    assert any(f.startswith(expected) for f in _findings(report, "reported")), _findings(report, "reported")


def test_a_trust_file_vouches_only_for_its_own_run(clean_run, tmp_path):
    store = Path(os.environ["FEDMED_KEY_STORE"])
    run_id = next((clean_run / "ledgers").glob("*/server.jsonl")).parent.name
    other = tmp_path / "other-run.toml"
    other.write_text((store / "runs" / f"{run_id}.toml").read_text().replace(run_id, "f" * 16))
    code, report = audit_of(clean_run, keys=[other], out_dir=tmp_path)
    assert (code, report["verdict"]) == (1, "FAILED")
    assert _findings(report, "keys") == [f"--keys {other}: is the trust file of run {'f' * 16}, but these ledgers are run {run_id}: another run was put in its place, or the wrong trust file was given"]
