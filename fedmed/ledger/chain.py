"""Append-only, hash-chained, signed JSON Lines ledgers: one per party per run.

Each line is one record in canonical JSON (sorted keys, no spaces) with its sequence
number, time, party, event, round, payload, the SHA-256 of the previous line, the
signer's key id and an Ed25519 signature over the rest. Lines are fsynced as written;
a ledger whose last line is incomplete (a crash mid-write) is refused for appending
and reported by the audit, never repaired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.ledger.keys import Signer, key_id, valid
from fedmed.run.directory import append_bytes, json_safe

GENESIS = "0" * 64
SIGNED = ("seq", "time", "party", "event", "round", "payload", "prev", "key_id")


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def signed_part(record: dict[str, Any]) -> bytes:
    return canonical({k: record[k] for k in SIGNED})


def checkpoint_body(checkpoint: dict[str, Any]) -> bytes:
    return canonical({k: checkpoint[k] for k in ("party", "run", "seq", "head", "key_id")})


def signature_ok(public: Ed25519PublicKey | None, sig: Any, data: bytes) -> bool:
    try:
        return public is not None and valid(public, base64.b64decode(str(sig), validate=True), data)
    except (binascii.Error, ValueError):
        return False


def record_problems(party: str, public: Ed25519PublicKey | None, index: int, line: bytes, record: dict[str, Any] | None, previous: bytes | None) -> list[str]:
    """What is wrong with record `index` of `party`'s ledger (`previous`: the line before
    it, None for the first), checked against the party's public key: [] if nothing."""
    if record is None:
        return ["not a JSON record"]
    if set(record) != {*SIGNED, "sig"}:
        return [f"fields {sorted(record)} are not those of a ledger record"]
    out = []
    if canonical(record) != line:
        out.append("not in canonical form: the line was edited after it was written")
    if record["seq"] != index:
        out.append(f"carries sequence number {record['seq']} at position {index}: records were deleted, inserted or reordered")
    expected = line_hash(previous) if previous is not None else GENESIS
    if record["prev"] != expected:
        out.append(f"its previous-record hash {str(record['prev'])[:12]}... is not the hash of the record before it ({expected[:12]}...): the chain is broken here")
    if record["party"] != party:
        out.append(f"written by {record['party']!r}, in {party}'s ledger")
    expected_key = key_id(public) if public else None
    if record["key_id"] != expected_key:
        out.append(f"signed with key {record['key_id']}, not {party}'s published key {expected_key}")
    elif not signature_ok(public, record["sig"], signed_part(record)):
        out.append("signature does not verify: the record was altered after signing, or its signature replaced")
    return out


@dataclass
class LedgerFile:
    """A ledger as read from disk: its complete lines, and a torn tail if any."""

    path: Path
    lines: list[bytes] = field(default_factory=list)
    records: list[dict[str, Any] | None] = field(default_factory=list)  # None: a line that is not JSON
    torn: bytes = b""  # an incomplete last line

    @classmethod
    def read(cls, path: Path) -> LedgerFile:
        data = path.read_bytes()
        *complete, tail = data.split(b"\n")
        out = cls(path, torn=tail)
        for line in complete:
            out.lines.append(line)
            try:
                record = json.loads(line)
                out.records.append(record if isinstance(record, dict) else None)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, nested beyond reason
                out.records.append(None)
        return out

    def problems(self, party: str, public: Ed25519PublicKey) -> list[str]:
        """Every record checked (chain, signatures, a torn tail): [] if the ledger is whole."""
        out = []
        for i, (line, record) in enumerate(zip(self.lines, self.records, strict=True)):
            try:
                out += [f"record {i}: {p}" for p in record_problems(party, public, i, line, record, self.lines[i - 1] if i else None)]
            except Exception as exc:  # noqa: BLE001 - a tampered record is reported, never a crash
                out.append(f"record {i}: malformed ({type(exc).__name__})")
        if self.torn:
            out.append(f"an incomplete last line ({len(self.torn)} bytes)")
        return out


class LedgerWriter:
    """Appends signed, chained records to `path`, continuing an existing ledger."""

    def __init__(self, path: Path, signer: Signer, run_id: str) -> None:
        self.path, self.signer, self.run_id = path, signer, run_id
        self.seq, self.head = 0, GENESIS
        if path.exists():
            existing = LedgerFile.read(path)
            if existing.torn:
                raise FedmedError(
                    f"ledger {path} ends with an incomplete record (a crash while writing?): "
                    "it is kept as evidence; run `fedmed audit` on it and start a new run"
                )
            if existing.lines:
                self.seq, self.head = len(existing.lines), line_hash(existing.lines[-1])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, event: str, server_round: int, payload: dict[str, Any]) -> dict[str, Any]:
        record = {
            "seq": self.seq,
            "time": round(time.time(), 3),
            "party": self.signer.party,
            "event": event,
            "round": server_round,
            "payload": json_safe(payload),
            "prev": self.head,
            "key_id": self.signer.key_id,
        }
        record["sig"] = base64.b64encode(self.signer.sign(signed_part(record))).decode()
        line = canonical(record)
        append_bytes(self.path, line + b"\n", sync=True)  # a full disk leaves no torn line
        self.seq, self.head = self.seq + 1, line_hash(line)
        return record

    def checkpoint(self) -> dict[str, Any]:
        """The ledger's length and head hash, signed: what the other side records."""
        body = {"party": self.signer.party, "run": self.run_id, "seq": self.seq - 1, "head": self.head, "key_id": self.signer.key_id}
        return {**body, "sig": base64.b64encode(self.signer.sign(checkpoint_body(body))).decode()}
