"""Reported figures: what a run directory shows (each round's record in `metrics.jsonl`,
`summary.json`, `heterogeneity.json`, the final model) against what the server signed.

The server signs each round's record before writing it, and at the end the digests of
the files it reports and the figures of the JSON ones. An edited figure is named by file,
round and field; a deleted or added file is named too."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from fedmed.audit.evidence import Evidence, Finding
from fedmed.ledger.digests import file_sha256
from fedmed.ledger.server import REPORTED_FILES
from fedmed.run.directory import RunDirectory, json_safe

SHOWN = 3  # differing fields named per record; the rest counted


def reported(evidence: Evidence) -> list[Finding]:
    if evidence.run_dir is None:  # ledgers given one by one: no reported files to hold to them
        return []
    server = evidence.server
    signed: dict[int, dict[str, Any]] = {}  # round -> the record the server signed last
    ends: list[tuple[int, dict[str, Any]]] = []
    for index, record in enumerate(server.file.records):
        event, payload = (record or {}).get("event"), (record or {}).get("payload") or {}
        if event == "round-record":
            signed[int(record["round"])] = payload.get("record") or {}
        elif event == "resume":  # rounds after the checkpoint are trained, and signed, again
            signed = {r: v for r, v in signed.items() if r <= int(payload.get("after_round", 0))}
        elif event == "reported":
            ends.append((index, payload))
    return _rounds(evidence.run_dir, signed) + _files(evidence, ends)


def _rounds(run: RunDirectory, signed: dict[int, dict[str, Any]]) -> list[Finding]:
    name = RunDirectory.METRICS
    if not (run / name).is_file():
        return [Finding("reported", name, f"is missing: the server signed {len(signed)} round records")] if signed else []
    out: list[Finding] = []
    text = (run / name).read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):  # the run writes whole lines; a reader of a live run skips such a line
        out.append(Finding("reported", name, "ends with an incomplete line the server did not sign: it was added or cut"))
    try:
        records = [json.loads(line) for line in text.split("\n") if line.strip()]
        written = {int(r["round"]): r for r in records}
    except (ValueError, KeyError, TypeError):
        return [Finding("reported", name, "is not one JSON round record per line: it was edited")]
    for r, n in sorted(Counter(int(r["round"]) for r in records).items()):
        if n > 1:
            out.append(Finding("reported", f"{name} round {r}", f"appears {n} times: the server signed one record per round"))
    for r in sorted(set(signed) | set(written)):
        where = f"{name} round {r}"
        if r not in written:
            out.append(Finding("reported", where, "is missing: the server signed a record for this round"))
        elif r not in signed:
            out.append(Finding("reported", where, "was not signed by the server: it was added"))
        else:
            out += _compare(where, signed[r], written[r])
    return out


def _files(evidence: Evidence, ends: list[tuple[int, dict[str, Any]]]) -> list[Finding]:
    run = evidence.run_dir
    assert run is not None
    if not ends:
        finished = bool(evidence.server.events("run-end"))
        # A run cut short (killed) writes its heterogeneity report early and never signs it.
        present = [n for label, n in REPORTED_FILES.items() if (run / n).is_file() and label in ("summary", "model")]
        if finished:
            return [Finding("reported", "server ledger", "signs none of the files the run reports (a run from before fedmed signed them): its figures are not verified")]
        return [Finding("reported", n, "exists, but the run did not finish and the server signed no such file: it was added") for n in present]
    _, payload = ends[-1]
    files, figures = payload.get("files") or {}, payload.get("figures") or {}
    out: list[Finding] = []
    for label, name in REPORTED_FILES.items():
        expected, actual = files.get(label), file_sha256(run / name)
        if expected == actual:
            continue
        if actual is None:
            out.append(Finding("reported", name, "was deleted: the server signed its digest"))
        elif expected is None:
            out.append(Finding("reported", name, "was not written by the run (the server signed no such file): it was added"))
        elif figures.get(label) is not None:
            fields = _compare(name, figures[label], _read_json(run, name))
            out += fields or [Finding("reported", name, "was rewritten: its figures are the signed ones, its bytes are not")]
        else:
            out.append(Finding("reported", name, f"was changed: its SHA-256 is {actual[:12]}..., the server signed {expected[:12]}..."))
    return out


def _read_json(run: RunDirectory, name: str) -> Any:
    try:
        return json.loads((run / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "(not readable JSON)"


def _compare(where: str, signed: Any, shown: Any) -> list[Finding]:
    """One finding per record: the first few fields that differ, by path."""
    diffs = list(_diff("", json_safe(signed), json_safe(shown)))
    if not diffs:
        return []
    named = "; ".join(f"{path or '(whole record)'} is {_short(b)}, the server signed {_short(a)}" for path, a, b in diffs[:SHOWN])
    more = f"; and {len(diffs) - SHOWN} more fields" if len(diffs) > SHOWN else ""
    return [Finding("reported", where, f"differs from what the server signed: {named}{more}")]


def _diff(path: str, a: Any, b: Any) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _diff(f"{path}.{key}" if path else str(key), a.get(key, "(absent)"), b.get(key, "(absent)"))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(f"{path}[{i}]", x, y)
    elif a != b or isinstance(a, bool) != isinstance(b, bool):
        yield path, a, b


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
