"""Integrity: each ledger's hash chain and signatures, the run's status file against the
server's ledger, and the checkpoints each party recorded of the other's ledger (no
truncation, no fork, no reordering)."""

from __future__ import annotations

from typing import Any

from fedmed.audit.evidence import Evidence, Finding, PartyLedger
from fedmed.ledger.chain import checkpoint_body, record_problems, signature_ok
from fedmed.run.directory import RunDirectory


def chain(party: PartyLedger) -> list[Finding]:
    out: list[Finding] = []

    def fail(index: int, message: str) -> None:
        out.append(Finding("integrity", party.where(index), message))

    for i, (line, record) in enumerate(zip(party.file.lines, party.file.records, strict=True)):
        try:
            _record(party, i, line, record, fail)
        except Exception as exc:  # noqa: BLE001 - a tampered record must be reported, never crash the audit
            fail(i, f"malformed record ({type(exc).__name__}): it cannot be verified")
    if party.file.torn:
        out.append(Finding("integrity", f"{party.name} after record {len(party.file.lines) - 1}", f"incomplete last line ({len(party.file.torn)} bytes): a torn write, e.g. a crash while writing"))
    return out


def _record(party: PartyLedger, i: int, line: bytes, record: dict[str, Any] | None, fail: Any) -> None:
    for problem in record_problems(party.party, party.public, i, line, record, party.file.lines[i - 1] if i else None):
        fail(i, problem)


def checkpoints(evidence: Evidence) -> list[Finding]:
    """Every checkpoint recorded in one ledger must match the other ledger at that point."""
    out: list[Finding] = []
    server = evidence.server
    run = evidence.run_id
    interrupted = evidence.interrupted_after
    if interrupted is not None:
        evidence.notes.append(f"the run was interrupted after round {interrupted}: it did not finish (`fedmed simulate --resume` continues a simulated run)")
    covered: dict[str, int] = {}  # hospital -> highest record the server holds a checkpoint for
    for index, record in enumerate(server.file.records):
        if record is None or record.get("event") not in ("train-round", "evaluate-round"):
            continue
        payload = record.get("payload", {})
        for entry in [*payload.get("participants", []), *payload.get("declined", [])]:
            hospital, checkpoint = entry.get("hospital"), entry.get("checkpoint")
            if checkpoint is None:
                out.append(Finding("checkpoints", server.where(index), f"no checkpoint recorded for {hospital}'s reply"))
                continue
            other = evidence.parties.get(str(hospital))
            if other is None:
                out.append(Finding("checkpoints", server.where(index), f"records a reply from {hospital}, but no ledger for {hospital} was given"))
                continue
            out += _match(server.where(index), checkpoint, other, run)
            covered[other.party] = max(covered.get(other.party, -1), int(checkpoint.get("seq", -1)))
    for name, hospital in evidence.hospitals.items():
        for index, record in hospital.events("server-checkpoint"):
            out += _match(hospital.where(index), record.get("payload", {}), server, run)
        last = len(hospital.file.lines) - 1
        if name not in covered and last >= 0:
            out.append(Finding("checkpoints", hospital.name, "the server's ledger holds no checkpoint of this ledger: it took no part in this run, or the server ledger was cut"))
        elif last > covered.get(name, last):
            finding = Finding("checkpoints", hospital.where(last), f"records {covered[name] + 1}-{last} are covered by no checkpoint in the server's ledger: the server ledger was cut, or the hospital wrote after its last reply")
            if _failures_after(server, hospital, covered[name]):  # its last reply may never have reached the server
                evidence.notes.append(f"{finding.where}: {finding.message} (the server recorded failed replies in that round: possibly this hospital's)")
            elif interrupted is not None:  # the round in flight when the run was stopped
                evidence.notes.append(f"{finding.where}: {finding.message} (the run was interrupted after round {interrupted}: the round it cut short)")
            else:
                out.append(finding)
    ends = server.events("run-end")
    if interrupted is None and (not ends or ends[-1][0] != len(server.file.lines) - 1):
        last = len(server.file.lines) - 1
        out.append(Finding("checkpoints", server.where(last), "the server ledger does not end with run-end: it was cut, or the run did not finish"))
    return out


def _failures_after(server: PartyLedger, hospital: PartyLedger, covered: int) -> bool:
    """Whether the server recorded failed replies in a round the hospital wrote about after `covered`."""
    rounds = {r.get("round") for r in hospital.file.records[covered + 1 :] if r is not None}
    return any(r["payload"].get("failures") for _, r in [*server.events("train-round"), *server.events("evaluate-round")] if r.get("round") in rounds)


def _match(where: str, checkpoint: dict[str, Any], other: PartyLedger, run: str | None) -> list[Finding]:
    """One checkpoint (party, run, seq, head, key id, signature) against that party's ledger."""
    try:
        seq, head = int(checkpoint["seq"]), str(checkpoint["head"])
        body = checkpoint_body(checkpoint)
    except (KeyError, TypeError, ValueError):
        return [Finding("checkpoints", where, f"malformed checkpoint of {other.party}: {checkpoint!r}")]
    if checkpoint["party"] != other.party or not signature_ok(other.public, checkpoint.get("sig"), body):
        return [Finding("checkpoints", where, f"checkpoint of {other.party} at record {seq} is not signed by {other.party}'s key")]
    if run is not None and checkpoint["run"] != run:
        return [Finding("checkpoints", where, f"checkpoint of {other.party} belongs to run {checkpoint['run']}, not {run}")]
    actual = other.hash_at(seq)
    if actual is None:
        return [Finding("checkpoints", where, f"{other.party} signed a checkpoint at record {seq}, but {other.name} has only {len(other.file.lines)} records: it was truncated")]
    if actual != head:
        return [Finding("checkpoints", where, f"{other.party}'s checkpoint at record {seq} has head {head[:12]}..., but {other.name} record {seq} hashes to {actual[:12]}...: the ledger was changed or forked")]
    return []


def status(evidence: Evidence) -> list[Finding]:
    """The run's status.json agrees with the end of the server's ledger: a run that says it
    was interrupted (or is running) ends with a signed `interrupted` record, at the same
    round; one that says it finished does not."""
    state = evidence.run_dir.status() if evidence.run_dir is not None else None
    if state is None:  # no status file (runs from before it, ledgers given one by one)
        return []
    where, said, interrupted = RunDirectory.STATUS, state.get("state"), evidence.interrupted_after
    if said in ("interrupted", "running") and interrupted is None:
        if said == "running" and evidence.server.events("run-end"):  # it stopped before marking itself finished
            evidence.notes.append(f"{where} says the run is running, but the server ledger records its end")
            return []
        return [Finding("integrity", where, f"says {said} but the server ledger has no signed interrupted record at its end")]
    if said == "interrupted" and state.get("after_round") != interrupted:
        return [Finding("integrity", where, f"says interrupted after round {state.get('after_round')}, but the server ledger's signed record says after round {interrupted}")]
    if said not in ("interrupted", "running") and interrupted is not None:
        return [Finding("integrity", where, f"says {said}, but the server ledger ends with a signed interrupted record (after round {interrupted})")]
    return []


def integrity(evidence: Evidence) -> list[Finding]:
    out = [f for party in evidence.parties.values() for f in chain(party)]
    return out + status(evidence) + checkpoints(evidence)


