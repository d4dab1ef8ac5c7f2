"""Identity: every reply the server recorded under a hospital's name carries that
hospital's own signed checkpoint (a node cannot be recorded under another's name), and
the nodes the server refused for answering under a name not their enrolled one are named."""

from __future__ import annotations

from fedmed.audit.evidence import Evidence, Finding
from fedmed.federation.wire import NAME_MISMATCH


def identity(evidence: Evidence) -> list[Finding]:
    out: list[Finding] = []
    server = evidence.server
    refused: dict[tuple[str, str], list[int]] = {}  # (hospital, reason) -> rounds
    for index, record in enumerate(server.file.records):
        if record is None or record.get("event") not in ("train-round", "evaluate-round"):
            continue
        payload = record.get("payload", {})
        for entry in [*payload.get("participants", []), *payload.get("declined", [])]:
            party = (entry.get("checkpoint") or {}).get("party")
            if party is not None and party != entry.get("hospital"):
                out.append(Finding("identity", server.where(index), f"a reply recorded as {entry.get('hospital')}'s carries {party}'s ledger checkpoint"))
        for entry in payload.get("failed", []):
            if NAME_MISMATCH in str(entry.get("reason", "")):
                refused.setdefault((str(entry.get("hospital")), str(entry["reason"])), []).append(int(record.get("round", 0)))
    for (hospital, reason), rounds in sorted(refused.items()):
        evidence.notes.append(f"the server refused {hospital}'s node in round(s) {', '.join(map(str, rounds))}: {reason}")
    return out
