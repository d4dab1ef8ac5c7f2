"""`fedmed audit`: run every check, print a readable report, write audit.json and
audit.md, and return the exit code (0: everything holds, 1: problems found)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmed import __version__
from fedmed.audit.claims import Spent, privacy
from fedmed.audit.consistency import consistency
from fedmed.audit.data import commitment
from fedmed.audit.empirical import empirical as empirical_check
from fedmed.audit.evidence import AuditInputError, Evidence, Finding, load
from fedmed.audit.identity import identity
from fedmed.audit.integrity import chain, checkpoints, status
from fedmed.audit.leakage import leakage
from fedmed.audit.reported import reported
from fedmed.errors import FedmedError
from fedmed.run.directory import RunDirectory

CHECKS = {
    "keys": "each party's public key comes from outside the run (--keys, the command line, or the key store of the machine that ran it) and matches the run's copy",
    "integrity": "every record's hash chain and Ed25519 signature",
    "checkpoints": "each ledger matches the signed checkpoints the other parties recorded (no truncation, fork or reordering)",
    "identity": "every reply recorded under a hospital's name carries that hospital's own signed checkpoint; refused nodes are named",
    "consistency": "models sent = models received, updates recorded = updates sent, aggregates follow from the updates",
    "reported": "metrics.jsonl's round records, summary.json, heterogeneity.json and model.pt are the ones the server signed",
    "privacy": "epsilon recomputed with dp-accounting from the logged parameters; budgets; reported figures",
    "leakage": "no paths, file names, patient, national or accession IDs, DICOM tags or names, birth dates, e-mails, image-sized arrays or over-long lines in ledgers, metrics or logs",
    "data": "the hospital's data commitment matches its data, under the secret it revealed",
    "empirical": "canary membership guesses give an epsilon lower bound no higher than the claim",
}


def _guarded(check: str, run: Callable[[], list[Finding]]) -> list[Finding]:
    """A check over records too damaged to read reports that, instead of crashing."""
    try:
        return run()
    except AuditInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged evidence is a finding, not a crash
        return [Finding(check, "evidence", f"could not be completed: a record or file is not what this check reads ({type(exc).__name__}: {str(exc)[:200]})")]


def audit(
    paths: list[Path], empirical: bool = False, out_dir: Path | None = None, console: Console | None = None,
    data_secret: Path | None = None, data: Path | None = None, keys: list[Path] | None = None,
) -> int:
    console = console or Console()
    if data is not None and data_secret is None:
        raise AuditInputError("--data goes with --data-secret: the hospital's secret, to check its data commitment")
    started = time.perf_counter()
    evidence = load(paths, keys)
    findings: dict[str, list[Finding]] = {
        "keys": evidence.key_findings,
        "integrity": [f for party in evidence.parties.values() for f in _guarded("integrity", lambda p=party: chain(p))]
        + _guarded("integrity", lambda: status(evidence)),
        "checkpoints": _guarded("checkpoints", lambda: checkpoints(evidence)),
        "identity": _guarded("identity", lambda: identity(evidence)),
        "consistency": _guarded("consistency", lambda: consistency(evidence)),
        "reported": _guarded("reported", lambda: reported(evidence)),
    }
    spent: list[Spent] = []

    def run_privacy() -> list[Finding]:
        found, spent[:] = privacy(evidence)
        return found

    findings["privacy"] = _guarded("privacy", run_privacy)
    findings["leakage"] = _guarded("leakage", lambda: leakage(evidence))
    if data_secret is not None:
        findings["data"] = commitment(evidence, data_secret, data)
    canaries: dict[str, Any] = {}
    if empirical:

        def run_empirical() -> list[Finding]:
            found, result = empirical_check(evidence, spent)
            canaries.update(result)
            return found

        findings["empirical"] = _guarded("empirical", run_empirical)
    report = _report(evidence, findings, spent, canaries, time.perf_counter() - started)
    target = out_dir or (evidence.run_dir.path if evidence.run_dir else Path.cwd())
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedmedError(f"cannot create the audit's folder {target}: {exc.strerror}") from None
    RunDirectory(target).write_audit(json.dumps(report, indent=2, sort_keys=True) + "\n", markdown(report))
    show(console, report)
    console.print(f"report: {target / RunDirectory.AUDIT_REPORT}, {target / RunDirectory.AUDIT}")
    return 0 if report["verdict"] == "PASSED" else 1


def _report(evidence: Evidence, findings: dict[str, list[Finding]], spent: list[Spent], canaries: dict, seconds: float) -> dict[str, Any]:
    parties = {name: {"records": len(p.file.lines), "ledger": p.file.path.name} for name, p in evidence.parties.items()}
    verdict = _verdict(evidence, findings)
    return {
        "passed": verdict == "PASSED",
        "verdict": verdict,
        "interrupted_after_round": evidence.interrupted_after,
        "keys": {party: {"key_id": k.key_id, "trusted_from": k.trusted_from} for party, k in sorted(evidence.keys.items())},
        "fedmed_version": __version__,
        "audited_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 2),
        "run_directory": evidence.run_dir.path.name if evidence.run_dir else None,
        "parties": parties,
        "checks": {
            name: {"what": CHECKS[name], "passed": not found, "findings": [f.__dict__ for f in found]} for name, found in findings.items()
        },
        "privacy": {s.party: s.row() for s in spent},
        "empirical": canaries or None,
        "notes": evidence.notes,
    }


def _verdict(evidence: Evidence, findings: dict[str, list[Finding]]) -> str:
    """PASSED; INTERRUPTED after round k when every check holds for a run a signal
    stopped; NOT VERIFIED when every check holds but only against the run's own keys (one
    "keys" finding for each party whose key came from nowhere else); FAILED."""
    if not any(findings.values()):
        return "PASSED" if evidence.interrupted_after is None else f"INTERRUPTED after round {evidence.interrupted_after}"
    untrusted = [party for party, use in evidence.keys.items() if use.trusted_from is None]
    if untrusted and len(findings["keys"]) == len(untrusted) and not any(found for name, found in findings.items() if name != "keys"):
        return "NOT VERIFIED"
    return "FAILED"


def _key_lines(report: dict[str, Any]) -> list[str]:
    return [f"{party}: key {k['key_id']}, trusted from {k['trusted_from'] or 'nowhere (only the run directory copy)'}" for party, k in report["keys"].items()]


def show(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"fedmed audit of {report['run_directory'] or 'the given ledgers'} ({len(report['parties'])} ledgers, {report['seconds']} s)")
    table.add_column("check")
    table.add_column("result")
    table.add_column("what it checks")
    for name, check in report["checks"].items():
        n = len(check["findings"])
        table.add_row(name, "[green]pass[/]" if check["passed"] else f"[red]FAIL ({n})[/]", check["what"])
    console.print(table)
    for name, check in report["checks"].items():
        for f in check["findings"][:25]:
            console.print(f"✗ [{name}] {f['where']}: {f['message']}", markup=False, highlight=False)
        if len(check["findings"]) > 25:
            console.print(f"  ... and {len(check['findings']) - 25} more {name} findings in audit.json")
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    for line in _key_lines(report):
        console.print(f"keys: {line}", markup=False, highlight=False)
    if report["privacy"]:
        console.print(_privacy_table(report["privacy"]))
    if report["empirical"]:
        e = report["empirical"]
        console.print(f"empirical: {e['correct']}/{e['guesses']} canary guesses right -> epsilon >= {e['epsilon_lower_bound']:.2f} (95 %), claimed {_eps(e['claimed_epsilon'])}")
    console.print({
        "PASSED": "[bold green]PASSED[/]: every check holds, against keys from outside the run",
        "NOT VERIFIED": "[bold yellow]NOT VERIFIED[/]: the checks hold, but only against the run directory's own keys (pass --keys)",
        f"INTERRUPTED after round {report.get('interrupted_after_round')}": (
            f"[bold yellow]INTERRUPTED after round {report.get('interrupted_after_round')}[/]: every check holds for the rounds it ran, but the run did not finish"
        ),
    }.get(report["verdict"], "[bold red]FAILED[/]: see the findings above"))


def _privacy_table(rows: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="privacy spent: claimed vs recomputed")
    for col in ("party", "mode", "accountant", "steps", "delta", "claimed", "recomputed", "budget"):
        table.add_column(col, justify="left" if col in ("party", "mode", "accountant") else "right")
    for party, r in rows.items():
        table.add_row(party, r["mode"], r["accountant"], str(r["steps"]), f"{r['delta']:.1e}", _eps(r["claimed_epsilon"]), _eps(r["recomputed_epsilon"]), _eps(r["budget"]) if r["budget"] else "-")
    return table


def _eps(value: float | None) -> str:
    return "infinite" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# fedmed audit: {report['verdict']}",
        "",
        f"Run: {report['run_directory'] or 'ledgers given one by one'}; audited {report['audited_at']} with fedmed {report['fedmed_version']} in {report['seconds']} s.",
        "",
        "| ledger | records |",
        "|---|---:|",
        *[f"| {p['ledger']} | {p['records']} |" for p in report["parties"].values()],
        "",
        "| check | result | what it checks |",
        "|---|---|---|",
        *[f"| {name} | {'pass' if c['passed'] else 'FAIL (' + str(len(c['findings'])) + ')'} | {c['what']} |" for name, c in report["checks"].items()],
        "",
    ]
    problems = [(name, f) for name, c in report["checks"].items() for f in c["findings"]]
    if problems:
        lines += ["## Findings", "", *[f"- **{name}**, {f['where']}: {f['message']}" for name, f in problems], ""]
    if report["notes"]:
        lines += ["## Notes (not failures)", "", *[f"- {note}" for note in report["notes"]], ""]
    lines += ["## Keys", "", *[f"- {line}" for line in _key_lines(report)], ""]
    if report["privacy"]:
        lines += [
            "## Privacy spent", "",
            "| party | mode | accountant | steps | delta | claimed epsilon | recomputed (dp-accounting) | budget |",
            "|---|---|---|---:|---:|---:|---:|---:|",
            *[f"| {p} | {r['mode']} | {r['accountant']} | {r['steps']} | {r['delta']:.1e} | {_eps(r['claimed_epsilon'])} | {_eps(r['recomputed_epsilon'])} | {_eps(r['budget']) if r['budget'] else '-'} |" for p, r in report["privacy"].items()],
            "",
        ]
    if report["empirical"]:
        e = report["empirical"]
        lines += [
            "## Empirical privacy (canaries)", "",
            f"{e['canaries']} canaries at {e['hospital']} ({e['included']} trained on); {e['correct']} of {e['guesses']} membership guesses right: "
            f"epsilon >= {e['epsilon_lower_bound']:.3f} with {e['confidence']:.0%} confidence (delta {e['delta']:.1e}); claimed {_eps(e['claimed_epsilon'])}.",
            "",
        ]
    return "\n".join(lines)
