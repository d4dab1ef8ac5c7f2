"""Append-only, hash-chained, signed JSON Lines ledgers: one per party per run.

Each line is one record in canonical JSON (sorted keys, no spaces) with its sequence
number, time, party, event, round, payload, the SHA-256 of the previous line, the
signer's key id and an Ed25519 signature over the rest. Lines are fsynced as written;
a ledger whose last line is incomplete (a crash mid-write) is refused for appending
and reported by the audit, never repaired.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.errors import FedmedError
from fedmed.ledger.keys import Signer
from fedmed.run.directory import json_safe

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
        with self.path.open("ab") as handle:
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.seq, self.head = self.seq + 1, line_hash(line)
        return record

    def checkpoint(self) -> dict[str, Any]:
        """The ledger's length and head hash, signed: what the other side records."""
        body = {"party": self.signer.party, "run": self.run_id, "seq": self.seq - 1, "head": self.head, "key_id": self.signer.key_id}
        return {**body, "sig": base64.b64encode(self.signer.sign(checkpoint_body(body))).decode()}
