"""The audit's leakage scan: each kind of patient data found where a careless hospital or
researcher would leave it (a nested metrics field), fedmed's own outputs and values that
only look like identifiers left alone, and input built to stall a regex scanned in
seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmed.audit.evidence import load
from fedmed.audit.leakage import MAX_DOCUMENT, MAX_LINE, OVERLAP, leakage, scan_file, scan_value

from .auditing import dp_config
from .inprocess import run_in_process


@pytest.fixture(scope="module")
def own_run(cache_dir, tmp_path_factory) -> Path:
    """A real small DP run of fedmed's federation logic in this process: every file
    fedmed writes into a run directory, nothing planted."""
    return run_in_process(dp_config(cache_dir, tmp_path_factory.mktemp("leakage-run")))


def _metrics_line(path: Path, field: dict) -> Path:
    """metrics.jsonl with one round whose per-hospital training metrics hold `field`."""
    record = {"round": 2, "hospitals": {"hospital-02": {"train": {"accuracy": 0.5, "examples": 24, **field}}}}
    path.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _word_line(path: Path, size: int, prefix: bytes = b"", end: bytes = b"") -> Path:
    """One JSON line of `size` bytes or so: a nested field holding word characters,
    `prefix` near the start and `end` at the end, written in pieces."""
    unit = b"aB3_" * 16384
    with path.open("wb") as handle:
        handle.write(b'{"round": 1, "metrics": {"note": "' + prefix)
        for _ in range(size // len(unit)):
            handle.write(unit)
        handle.write(end + b'"}}\n')
    return path


def test_a_run_s_own_outputs_have_no_findings(own_run):
    assert leakage(load([own_run])) == []


@pytest.mark.parametrize(
    ("field", "what"),
    [
        ({"worst": "DOE^JOHN"}, "a person's name (DICOM)"),
        ({"reader": "Doe^John^^Dr"}, "a person's name (DICOM)"),
        ({"dob": "1980-03-12"}, "a date of birth"),
        ({"birth_date": 19800312}, "a date of birth"),
        ({"note": "hardest case born 12/03/1980"}, "a date of birth"),
        ({"note": "Date of birth: 12 March 1980"}, "a date of birth"),
        ({"PatientBirthDate": "19800312"}, "a date of birth"),
        ({"note": "123-45-6789"}, "a national identifier (US SSN)"),
        ({"note": "943 476 5919"}, "a national identifier (NHS number)"),
        ({"nhs_number": 9434765919}, "a national identifier"),
        ({"note": "811218-9876"}, "a national identifier (Swedish personnummer)"),
        ({"ssn": "123456789"}, "a national identifier"),
        ({"contact": "jane.doe@example.org"}, "an e-mail address"),
        ({"accession": "A1234567"}, "an accession number"),
        ({"note": "Acc. No. 20230012"}, "an accession number"),
        ({"mrn": "00123456"}, "a patient identifier"),
    ],
)
def test_patient_data_in_a_nested_metrics_field_is_found(field, what, tmp_path):
    found = scan_file(_metrics_line(tmp_path / "metrics.jsonl", field), "metrics.jsonl")
    key = next(iter(field))
    assert any(f.where == "metrics.jsonl line 1" and f.message.startswith(f"`{key}` holds {what}: ") for f in found), found


def test_a_key_that_is_patient_data_is_reported_without_repeating_it(tmp_path):
    found = scan_file(_metrics_line(tmp_path / "metrics.jsonl", {"jane.doe@example.org": 0.5}), "metrics.jsonl")
    assert [f.message for f in found] == ["a key holds an e-mail address: 'jane...rg'"]


@pytest.mark.parametrize(
    "field",
    [
        {"audited_at": "2026-12-02T18:00:00Z"},
        {"finished": "2026-12-02 18:00:00.123+00:00"},
        {"time": 1796240711.865},
        {"loss": "1.5770272971471548"},
        {"model": "ef32c63b13f34c90921147772b85d276dc018c84529ed53b41e28993f4757d25"},
        {"key": "9697fca9c7178873"},
        {"versions": "fedmed 0.1.0, flwr 1.22.0, torch 2.5.1+cpu, flwr@1.22.0"},
        {"name": "20261202-194511-federated"},
        {"id": "123e4567-e89b-12d3-a456-426614174000"},
        {"note": "scaled by 2^10, x^2, e^-t, footnote [^1]"},
        {"note": "visited 1980-03-12"},
        {"note": "943 476 5918"},
        {"note": "000-12-3456 and 123-45-678"},
        {"note": "811218-9875"},
        {"note": "accuracy 0.9381, accountant prv, accession number unknown"},
        {"seed": 20261202, "round": 12345678},
    ],
)
def test_values_that_only_look_like_identifiers_are_left_alone(field):
    assert scan_value({"round": 2, "hospitals": {"hospital-01": {"train": field}}}, "metrics.jsonl line 1") == []


def test_each_string_of_a_record_is_read_alone(tmp_path):
    """The scan joins a batch's strings; what two neighbours would make together (two
    halves of a path or of a DICOM tag, a name and a caret) is not a match."""
    field = {"notes": ["see /tmp", "x/y", "(0010,", "0010)", "DOE", "^JOHN"]}
    found = scan_file(_metrics_line(tmp_path / "metrics.jsonl", field), "metrics.jsonl")
    assert found == []


def test_one_string_among_thousands_is_found_under_its_own_key(tmp_path):
    field = {f"k{i}": f"v{i}" for i in range(5000)} | {"k2500": "jane.doe@example.org"}
    found = scan_file(_metrics_line(tmp_path / "metrics.jsonl", field), "metrics.jsonl")
    assert [f.message for f in found] == ["`k2500` holds an e-mail address: 'jane...rg'"]


@pytest.mark.timeout(60)  # the file-name pattern fedmed had took time quadratic in this: months
def test_a_50_mb_line_is_scanned_and_reported_as_over_long(tmp_path):
    path = _word_line(tmp_path / "metrics.jsonl", 50_000_000, end=b".dcmx")
    found = scan_file(path, "metrics.jsonl")
    assert len(found) == 1
    assert found[0].where == "metrics.jsonl line 1"
    assert found[0].message.startswith(f"is {path.stat().st_size - 1:,} bytes long, over the {MAX_LINE:,} any record of fedmed's takes")


def test_patient_data_across_a_window_of_an_over_long_line_is_found(tmp_path):
    """An address that straddles the end of the first window is in the next, which
    repeats the last OVERLAP characters."""
    address = b"jane.doe@example.org"
    offset = MAX_LINE + 1 - len(b'{"round": 1, "metrics": {"note": "') - len(b" " + address) // 2  # the first read ends mid-address
    path = _word_line(tmp_path / "metrics.jsonl", 2 * MAX_LINE, prefix=b"x" * offset + b" " + address + b" ")
    found = scan_file(path, "metrics.jsonl")
    assert OVERLAP > len(address)
    assert [f.message for f in found][1:] == ["the line holds an e-mail address: 'jane...rg'"]


def test_an_over_long_string_in_a_json_document_is_reported(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"per_hospital": {"hospital-01": {"note": "a" * (MAX_LINE + 1)}}}), encoding="utf-8")
    found = scan_file(path, "summary.json")
    assert len(found) == 1
    assert found[0].where == "summary.json"
    assert found[0].message.startswith(f"`note` holds {MAX_LINE + 1:,} characters, over the {MAX_LINE:,}")


def test_a_json_document_too_large_to_parse_whole_is_scanned_line_by_line(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{\n  "note": "' + "a" * MAX_DOCUMENT + '",\n  "contact": "jane.doe@example.org"\n}\n', encoding="utf-8")
    found = scan_file(path, "summary.json")
    assert [f.where for f in found] == ["summary.json line 2", "summary.json line 3"]
    assert found[0].message.startswith(f"is {MAX_DOCUMENT + 13:,} bytes long")
    assert found[1].message == "the line holds an e-mail address: 'jane...rg'"
