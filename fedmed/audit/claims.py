"""Privacy claims: each hospital's epsilon recomputed from the DP parameters its ledger
logged (sigma, sample rate, steps, delta), with Google's dp-accounting, an accountant
independent of the Opacus one fedmed trains with; budgets honoured; and the figures the
run reports in summary.json equal to those the ledgers support (metrics.jsonl's, with
every other per-hospital figure, are the consistency check's)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dp_accounting

from fedmed.audit.evidence import Evidence, Finding, PartyLedger
from fedmed.privacy.accounting import StepHistory
from fedmed.run.directory import RunDirectory

# Like against like (REFERENCE section 3): dp-accounting's PLD against Opacus's PRV agree
# to about 0.01; RDP against RDP to about 1 %.
RELATIVE = {"prv": 0.02, "rdp": 0.01}
ABSOLUTE = 0.01


@lru_cache(maxsize=512)
def independent_epsilon(kind: str, entries: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon after every (sigma, sample rate, steps) entry: PLD for fedmed's `prv`, RDP for `rdp`."""
    events = [
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), k)
        for s, q, k in entries
        if k > 0
    ]
    if not events:
        return 0.0
    if any(s == 0 for s, _, _ in entries):
        return math.inf
    accountant = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    return float(accountant.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(delta))


def agree(kind: str, claimed: float, recomputed: float) -> bool:
    if math.isinf(recomputed) or claimed is None:
        return claimed is None and math.isinf(recomputed)
    return abs(claimed - recomputed) <= max(ABSOLUTE, RELATIVE.get(kind, 0.02) * recomputed)


@dataclass
class Spent:
    """One party's privacy, as its ledger claims it and as recomputed."""

    party: str
    mode: str
    accountant: str
    delta: float
    claimed: float | None
    recomputed: float
    budget: float
    steps: int
    where: str

    def row(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "accountant": self.accountant, "delta": self.delta, "steps": self.steps,
            "claimed_epsilon": self.claimed, "recomputed_epsilon": None if math.isinf(self.recomputed) else self.recomputed,
            "budget": self.budget or None,
        }


def _entries(records: list[tuple[int, dict[str, Any]]], kind: str) -> tuple[tuple[float, float, int], ...]:
    """The logged rounds as the accountant's (sigma, sample rate, steps) history."""
    history = StepHistory(kind)
    for _, record in records:
        p = record["payload"]["privacy"]
        history.add(float(p["sigma"]), float(p["sample_rate"]), int(p["steps"]))
    return tuple(history.entries)


def hospital_spent(hospital: PartyLedger) -> Spent | None:
    trained = [(i, r) for i, r in hospital.events("train") if r["payload"].get("privacy", {}).get("mode") == "sample"]
    if not trained:
        return None
    index, last = trained[-1]
    p = last["payload"]["privacy"]
    entries = _entries(trained, p["accountant"])
    return Spent(
        hospital.party, "sample", p["accountant"], float(p["delta"]), p.get("epsilon"),
        independent_epsilon(p["accountant"], entries, float(p["delta"])), float(p.get("budget") or 0.0),
        sum(k for _, _, k in entries), hospital.where(index),
    )


def server_spent(server: PartyLedger) -> Spent | None:
    # A round releases (and spends) only when it produced a new model.
    rounds = [(i, r) for i, r in server.events("train-round") if r["payload"].get("privacy") and r["payload"].get("new_global_sha256")]
    if not rounds:
        return None
    index, last = rounds[-1]
    p = last["payload"]["privacy"]
    entries = tuple((float(r["payload"]["privacy"]["sigma"]), 1.0, 1) for _, r in rounds)
    merged = ((entries[0][0], 1.0, len(entries)),) if len({e[0] for e in entries}) == 1 else entries
    return Spent(server.party, "client", p["accountant"], float(p["delta"]), p.get("epsilon"),
                 independent_epsilon(p["accountant"], merged, float(p["delta"])), 0.0, len(entries), server.where(index))


def privacy(evidence: Evidence) -> tuple[list[Finding], list[Spent]]:
    spent = [s for s in [server_spent(evidence.server), *(hospital_spent(h) for h in evidence.hospitals.values())] if s]
    out: list[Finding] = []
    for s in spent:
        if not agree(s.accountant, s.claimed, s.recomputed):
            out.append(Finding("privacy", s.where, f"{s.party} claims epsilon {_fmt(s.claimed)}; its logged parameters give {_fmt(s.recomputed)} (dp-accounting, {_method(s.accountant)}, delta {s.delta:g})"))
        if s.budget and s.recomputed > s.budget * (1 + RELATIVE.get(s.accountant, 0.02)):
            out.append(Finding("privacy", s.where, f"{s.party} spent epsilon {_fmt(s.recomputed)}, above its budget of {s.budget:g}"))
    out += _reported(evidence, {s.party: s for s in spent})
    return out, spent


def _reported(evidence: Evidence, spent: dict[str, Spent]) -> list[Finding]:
    """What summary.json says each hospital spent, against its ledger."""
    if evidence.run_dir is None:
        return []
    out = []
    summary_path = evidence.run_dir / RunDirectory.SUMMARY
    if summary_path.exists():
        try:
            table = json.loads(summary_path.read_text(encoding="utf-8")).get("privacy") or {}
        except json.JSONDecodeError:
            return [Finding("privacy", RunDirectory.SUMMARY, "not valid JSON")]
        rows = table.get("hospitals", {}) if table.get("mode") == "sample" else ({"server": table.get("federation", {})} if table else {})
        for party, row in rows.items():
            s = spent.get(party)
            claimed = row.get("epsilon")
            if claimed is None or (s is None and claimed == 0):  # declined before ever training
                continue
            if s is None:
                out.append(Finding("privacy", RunDirectory.SUMMARY, f"reports epsilon {claimed} for {party}, whose ledger logged no private training"))
            elif not agree(s.accountant, float(claimed), s.recomputed):
                out.append(Finding("privacy", RunDirectory.SUMMARY, f"reports epsilon {_fmt(claimed)} for {party}; its ledger's parameters give {_fmt(s.recomputed)}"))
    return out


def _fmt(value: float | None) -> str:
    return "none" if value is None else ("infinite" if math.isinf(value) else f"{value:.3f}")


def _method(kind: str) -> str:
    return "RDP" if kind == "rdp" else "PLD"
