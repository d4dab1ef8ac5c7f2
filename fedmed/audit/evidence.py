"""What an audit reads: each party's ledger and public key, and (for a run directory)
the run's own files. Unusable input is an AuditInputError (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.ledger.chain import LedgerFile, line_hash
from fedmed.ledger.keys import load_public
from fedmed.ledger.server import SERVER
from fedmed.run.directory import RunDirectory


class AuditInputError(FedmedError):
    """The input cannot be audited at all (missing files, no server ledger)."""


@dataclass(frozen=True)
class Finding:
    check: str  # integrity | checkpoints | consistency | privacy | leakage | empirical
    where: str  # the file and record that show it
    message: str

    def line(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


@dataclass
class PartyLedger:
    party: str
    file: LedgerFile
    public: Ed25519PublicKey | None

    @property
    def name(self) -> str:
        return self.file.path.name

    def where(self, index: int) -> str:
        record = self.file.records[index] if index < len(self.file.records) else None
        what = f" ({record.get('event')}, round {record.get('round')})" if record else ""
        return f"{self.name} record {index}{what}"

    def hash_at(self, index: int) -> str | None:
        return line_hash(self.file.lines[index]) if 0 <= index < len(self.file.lines) else None

    def events(self, event: str) -> list[tuple[int, dict[str, Any]]]:
        return [(i, r) for i, r in enumerate(self.file.records) if r is not None and r.get("event") == event]


@dataclass
class Evidence:
    parties: dict[str, PartyLedger]
    run_dir: RunDirectory | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def server(self) -> PartyLedger:
        return self.parties[SERVER]

    @property
    def hospitals(self) -> dict[str, PartyLedger]:
        return {k: v for k, v in sorted(self.parties.items()) if k != SERVER}


def load(paths: list[Path]) -> Evidence:
    """A run directory, or ledger files (`*.jsonl`) and public keys (`*.pub`) from a deployment."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise AuditInputError(f"{missing[0]} does not exist")
    if len(paths) == 1 and paths[0].is_dir():
        return _from_run_dir(paths[0])
    ledgers = [p for p in paths if p.suffix == ".jsonl"]
    keys = [p for p in paths if p.suffix == ".pub"]
    other = [p for p in paths if p not in ledgers and p not in keys]
    if other:
        raise AuditInputError(f"{other[0]} is neither a run directory, a ledger (.jsonl) nor a public key (.pub)")
    return Evidence(_parties(ledgers, keys))


def _from_run_dir(path: Path) -> Evidence:
    run_dir = RunDirectory(path)
    folder = run_dir / RunDirectory.LEDGERS
    runs = run_dir.ledger_runs()
    if not runs:
        raise AuditInputError(f"{path} has no ledgers/ folder with a run's ledgers (the pooled and local baselines, and runs from before ledgers existed, have none)")
    if len(runs) > 1:
        raise AuditInputError(f"{folder} holds {len(runs)} runs' ledgers; pass one run's ledger files and keys instead")
    return Evidence(_parties(sorted(runs[0].glob("*.jsonl")), sorted((folder / "keys").glob("*.pub"))), run_dir=run_dir)


def _parties(ledgers: list[Path], keys: list[Path]) -> dict[str, PartyLedger]:
    public = {p.stem: load_public(p) for p in keys}
    parties = {}
    for path in ledgers:
        party = path.stem
        if party in parties:
            raise AuditInputError(f"two ledgers for {party}: {parties[party].file.path} and {path}")
        if party not in public:
            raise AuditInputError(f"no public key for {party}: pass {party}.pub (exchanged at enrolment) with its ledger")
        try:
            parties[party] = PartyLedger(party, LedgerFile.read(path), public[party])
        except OSError as exc:
            raise AuditInputError(f"cannot read {path}: {exc.strerror}") from None
    if SERVER not in parties:
        raise AuditInputError("no server ledger (server.jsonl) among the inputs: the audit needs it to check the hospitals' ledgers")
    return parties
