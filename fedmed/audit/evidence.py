"""What an audit reads: each party's ledger and public key, and (for a run directory)
the run's own files. Unusable input is an AuditInputError (exit 2).

Public keys are trusted only from outside the run: `--keys` files, `.pub` files named on
the command line, or the trust file the run's own process wrote into this machine's key
store. The copies in a run's `ledgers/keys/` are used only where nothing else is at
hand, and the audit then says so (a "keys" finding: not verified)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.ledger.chain import LedgerFile, line_hash, record_problems
from fedmed.ledger.keys import KeyStore, TrustedKey, default_key_store, key_id, load_public, read_trusted
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


@dataclass(frozen=True)
class KeyUse:
    """The key a party's ledger was checked against, and where the audit got it."""

    key_id: str
    trusted_from: str | None  # None: only the run's own copy, which proves nothing


@dataclass
class Evidence:
    parties: dict[str, PartyLedger]
    run_dir: RunDirectory | None = None
    notes: list[str] = field(default_factory=list)
    keys: dict[str, KeyUse] = field(default_factory=dict)
    key_findings: list[Finding] = field(default_factory=list)

    @property
    def server(self) -> PartyLedger:
        return self.parties[SERVER]

    @property
    def hospitals(self) -> dict[str, PartyLedger]:
        return {k: v for k, v in sorted(self.parties.items()) if k != SERVER}

    @property
    def run_id(self) -> str | None:
        """The ledger run id the server's `run-start` record names."""
        starts = self.server.events("run-start")
        return starts[0][1].get("payload", {}).get("run") if starts else None

    @cached_property
    def interrupted_after(self) -> int | None:
        """The round after which a signal stopped the run, if the server's ledger ends with a
        valid `interrupted` record (a resumed run's is followed by its `resume` record)."""
        server = self.parties.get(SERVER)
        if server is None or not server.file.records or server.file.torn:
            return None
        index, record = len(server.file.records) - 1, server.file.records[-1]
        if record is None or record.get("event") != "interrupted":
            return None
        previous = server.file.lines[index - 1] if index else None
        try:
            if record_problems(server.party, server.public, index, server.file.lines[index], record, previous):
                return None
            after = record["payload"].get("after_round")
        except Exception:  # noqa: BLE001 - a malformed record is no valid one (the integrity check says why)
            return None
        return after if isinstance(after, int) and not isinstance(after, bool) else None


def load(paths: list[Path], trusted_files: list[Path] | None = None) -> Evidence:
    """A run directory, or ledger files (`*.jsonl`) and public keys (`*.pub`) from a
    deployment; `trusted_files`: `--keys` (trust files or `PARTY.pub`)."""
    missing = [p for p in [*paths, *(trusted_files or [])] if not p.exists()]
    if missing:
        raise AuditInputError(f"{missing[0]} does not exist")
    copied = [p for p in trusted_files or [] if p.suffix == ".pub" and run_copy(p)]
    if copied:
        raise AuditInputError(f"--keys {copied[0]} is a run directory's own copy of a key: it proves nothing about that run; give the run's trust file or a key kept apart from it")
    trusted = _trusted(trusted_files or [])
    if len(paths) == 1 and paths[0].is_dir():
        return _from_run_dir(paths[0], trusted)
    ledgers = [p for p in paths if p.suffix == ".jsonl"]
    keys = [p for p in paths if p.suffix == ".pub"]
    other = [p for p in paths if p not in ledgers and p not in keys]
    if other:
        raise AuditInputError(f"{other[0]} is neither a run directory, a ledger (.jsonl) nor a public key (.pub)")
    named = {p.stem: TrustedKey(p.stem, f"given on the command line ({p.name})", public=load_public(p)) for p in keys if not run_copy(p)}
    copies = {p.stem: p for p in keys if run_copy(p)}
    evidence = Evidence({})
    evidence.parties = _parties(ledgers, {**named, **trusted}, copies, evidence)
    _same_run(evidence, trusted)
    return evidence


def _trusted(files: list[Path]) -> dict[str, TrustedKey]:
    out: dict[str, TrustedKey] = {}
    for path in files:
        for key in read_trusted(path):
            if key.party in out and out[key.party].digest != key.digest:  # the same key from two files is one
                raise AuditInputError(f"--keys gives two keys for {key.party} ({out[key.party].source}, {key.source}): give one")
            out[key.party] = key
    return out


def run_copy(path: Path) -> bool:
    """A key file in a run directory's `ledgers/keys/`: the run's own copy, which whoever
    holds the run could have replaced, however it is named to the audit."""
    folder = path.resolve().parent
    return folder.name == "keys" and folder.parent.name == RunDirectory.LEDGERS and (folder.parent.parent / RunDirectory.CONFIG).is_file()


def _from_run_dir(path: Path, trusted: dict[str, TrustedKey]) -> Evidence:
    run_dir = RunDirectory(path)
    folder = run_dir / RunDirectory.LEDGERS
    runs = run_dir.ledger_runs()
    if not runs:
        raise AuditInputError(f"{path} has no ledgers/ folder with a run's ledgers (the pooled and local baselines, and runs from before ledgers existed, have none)")
    if len(runs) > 1:
        raise AuditInputError(f"{folder} holds {len(runs)} runs' ledgers; pass one run's ledger files and keys instead")
    if not trusted:  # the run was made on this machine: its process left its keys in the key store
        own = KeyStore(default_key_store()).trust_file(runs[0].name)
        if own.is_file():
            trusted = {k.party: replace(k, source=f"this machine's key store ({own})") for k in read_trusted(own)}
    copies = {p.stem: p for p in sorted((folder / "keys").glob("*.pub"))}
    evidence = Evidence({}, run_dir=run_dir)
    evidence.parties = _parties(sorted(runs[0].glob("*.jsonl")), trusted, copies, evidence)
    _same_run(evidence, trusted)
    return evidence


def _same_run(evidence: Evidence, trusted: dict[str, TrustedKey]) -> None:
    """A trust file vouches for one run: a party's keys sign all its runs, so another
    genuine run put in this one's place would pass against them."""
    run_id = evidence.run_id
    for source, run in sorted({(k.source, k.run) for k in trusted.values() if k.run and run_id and k.run != run_id}):
        evidence.key_findings.append(Finding("keys", source, f"is the trust file of run {run}, but these ledgers are run {run_id}: another run was put in its place, or the wrong trust file was given"))


def _parties(ledgers: list[Path], trusted: dict[str, TrustedKey], copies: dict[str, Path], evidence: Evidence) -> dict[str, PartyLedger]:
    """Each ledger with the key to check it against: the trusted one, else the run's copy
    (then a "keys" finding)."""
    parties = {}
    for path in ledgers:
        party = path.stem
        if party in parties:
            raise AuditInputError(f"two ledgers for {party}: {parties[party].file.path} and {path}")
        public = _key(party, trusted.get(party), copies.get(party), evidence)
        try:
            parties[party] = PartyLedger(party, LedgerFile.read(path), public)
        except OSError as exc:
            raise AuditInputError(f"cannot read {path}: {exc.strerror}") from None
    if SERVER not in parties:
        raise AuditInputError("no server ledger (server.jsonl) among the inputs: the audit needs it to check the hospitals' ledgers")
    return parties


def _key(party: str, trusted: TrustedKey | None, copy_path: Path | None, evidence: Evidence) -> Ed25519PublicKey:
    copy = load_public(copy_path) if copy_path else None
    where = f"ledgers/keys/{party}.pub"
    if trusted is None:
        if copy is None:
            raise AuditInputError(f"no public key for {party}: pass {party}.pub (exchanged at enrolment) or the run's trust file with --keys")
        evidence.keys[party] = KeyUse(key_id(copy), None)
        evidence.key_findings.append(Finding("keys", where, (
            f"{party}'s public key comes only from the run directory, whose holder could have re-signed every record with a key of their own: "
            "not verified. Pass the run's trust file (`fedmed simulate` printed its path) or the parties' keys with --keys"
        )))
        return copy
    if copy is not None and not trusted.matches(copy):
        evidence.key_findings.append(Finding("keys", where, f"is not the key trusted for {party} ({trusted.source}): the run's keys were replaced"))
    public = trusted.public or copy
    if public is None:
        raise AuditInputError(f"{trusted.source} gives only a fingerprint for {party}, and the run has no {party}.pub to match it with")
    evidence.keys[party] = KeyUse(key_id(public), trusted.source)
    return public
