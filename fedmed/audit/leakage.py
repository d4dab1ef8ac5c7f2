"""Leakage: nothing in a run's ledgers, metrics or logs that points at a patient: file
paths, image file names, patient-identifier patterns, DICOM tags or UIDs, or arrays the
size of an image. Strings are scanned where they sit in the JSON/TOML, so a digest or a
signature is not mistaken for an identifier."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmed.audit.evidence import Evidence, Finding
from fedmed.run.directory import RunDirectory

PIXEL_LIKE = 1024  # numbers in one array: a 32x32 image
SCANNED = (".jsonl", ".json", ".toml", ".md", ".csv", ".log", ".txt")
NOT_EVIDENCE = (RunDirectory.AUDIT, RunDirectory.AUDIT_REPORT)
# Keys whose values are fedmed's own, not a hospital's: the researcher's output folder,
# digests, signatures and key ids.
ALLOWED_KEYS = re.compile(r"^(dir|sig|head|prev|key_id|run|.*_sha256)$")
PATTERNS = [
    ("a file path", re.compile(r"(?:^|[\s\"'=(:])(?:~|[A-Za-z]:)?[\\/](?:[^\s\\/\"']+[\\/])+[^\s\\/\"']*")),
    ("an image file name", re.compile(r"[\w\-.]+\.(?:dcm|dicom|nii|nii\.gz|mha|mhd|nrrd|png|jpe?g|tiff?|bmp|ima)\b", re.I)),
    ("a patient identifier", re.compile(r"\b(?:patient|pat|subject|subj|sub|case|mrn|pid)[\s_\-#:]*\d{2,}\b", re.I)),
    ("a patient identifier (TCGA barcode)", re.compile(r"\bTCGA-[A-Z0-9]{2}-[A-Z0-9]{4}\b", re.I)),
    ("a patient identifier (BraTS case)", re.compile(r"\bBraTS\d*[_-]\w*\d{3,}\b", re.I)),
    ("a DICOM tag", re.compile(r"\(\s*[0-9A-Fa-f]{4}\s*,\s*[0-9A-Fa-f]{4}\s*\)")),
    ("a DICOM attribute", re.compile(r"\b(?:PatientName|PatientID|PatientBirthDate|PatientSex|PatientAge|StudyInstanceUID|SeriesInstanceUID|SOPInstanceUID|AccessionNumber|InstitutionName|ReferringPhysicianName|StudyDate)\b")),
    ("a DICOM UID", re.compile(r"\b1\.2\.840\.\d+(?:\.\d+){2,}\b")),
]


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key, leaf) pairs; lists of numbers come whole, to be measured."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k), str(k)
            yield from _strings(v, str(k))
    elif isinstance(value, list):
        if value and all(isinstance(v, (int, float, list)) for v in value):
            yield key, value
        else:
            for v in value:
                yield from _strings(v, key)
    else:
        yield key, value


def _size(value: Any) -> int:
    return sum(_size(v) for v in value) if isinstance(value, list) else 1


def scan_value(value: Any, where: str) -> list[Finding]:
    out = []
    for key, leaf in _strings(value):
        if isinstance(leaf, list):
            if _size(leaf) >= PIXEL_LIKE:
                out.append(Finding("leakage", where, f"`{key}` holds an array of {_size(leaf)} numbers: the size of an image"))
        elif isinstance(leaf, str) and not ALLOWED_KEYS.match(key):
            out += [Finding("leakage", where, f"`{key}` holds {what}: {_shown(m.group(0))}") for what, rx in PATTERNS for m in [rx.search(leaf)] if m]
    return out


def _shown(text: str) -> str:
    """Enough to find it, not the whole identifier in the audit's own report."""
    text = text.strip(" \"'=(:")
    return repr(text if len(text) <= 8 else text[:4] + "..." + text[-2:])


def scan_file(path: Path, name: str) -> list[Finding]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [Finding("leakage", name, "not UTF-8 text: binary data in a text output")]
    if path.suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                out += scan_value(json.loads(line), f"{name} line {number}")
            except json.JSONDecodeError:
                out += scan_value(line, f"{name} line {number}")
        return out
    if path.suffix == ".json":
        try:
            return scan_value(json.loads(text), name)
        except json.JSONDecodeError:
            pass
    if path.suffix == ".toml":
        try:
            return scan_value(tomllib.loads(text), name)
        except tomllib.TOMLDecodeError:
            pass
    return [f for number, line in enumerate(text.splitlines(), 1) for f in scan_value(line, f"{name} line {number}")]


def leakage(evidence: Evidence) -> list[Finding]:
    files = {party.file.path for party in evidence.parties.values()}
    root = evidence.run_dir.path if evidence.run_dir else None
    if root is not None:
        files |= {p for p in root.rglob("*") if p.is_file() and p.suffix in SCANNED and p.name not in NOT_EVIDENCE}
    out = []
    for path in sorted(files):
        out += scan_file(path, str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name)
    return out
