"""The run's privacy table: what each hospital (sample-level) or the federation
(client-level) has spent, as the summary records and the terminal shows it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fedmed.config import FedmedConfig
from fedmed.run.record import RunLog

KEYS = ("epsilon", "delta", "sigma", "sample_rate", "steps", "max_grad_norm")


def table(cfg: FedmedConfig, log: RunLog, client_level: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Sample-level: each hospital's latest cumulative figures (from its own replies);
    client-level: the server's. None when privacy is off."""
    p = cfg.privacy
    if p.mode == "off":
        return None
    common = {
        "mode": p.mode,
        "accountant": p.accountant,
        "target_epsilon": p.epsilon,
        "noise": "from the run seed (reproducible; not private)" if p.reproducible else "system entropy",
        "secure_mode": False,
    }
    if p.mode == "client":
        return {**common, "unit": "one hospital's whole contribution", "federation": client_level or {}}
    hospitals: dict[str, dict[str, Any]] = {}
    for number in sorted(log.rounds):
        for site, update in log.rounds[number].trained.items():
            row = hospitals.setdefault(site, {"rounds_trained": 0})
            row.update(_figures(update.metrics))
            row["rounds_trained"] += 1
    for site, (number, decline) in log.latest_declines().items():
        row = hospitals.setdefault(site, {"rounds_trained": 0})
        if "dp-epsilon" in decline.privacy:
            row.update(_figures(decline.privacy))
        row["declined"] = {"round": number, "reason": decline.reason}
    rows = dict(sorted(hospitals.items()))
    spent = [r["epsilon"] for r in rows.values() if "epsilon" in r]
    return {**common, "unit": "one training image at one hospital", "max_epsilon": max(spent, default=0.0), "hospitals": rows}


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """A hospital's `dp-*` figures from its reply, as the table's keys."""
    row = {k: metrics[f"dp-{k.replace('_', '-')}"] for k in KEYS}
    row["budget"] = metrics["dp-budget"] or None
    return row


def print_table(console: Console, privacy: dict[str, Any] | None) -> None:
    if privacy is None:
        return
    out = Table(title=f"privacy spent ({privacy['mode']}-level DP, {privacy['accountant']} accountant; protects {privacy['unit']})")
    for col in ("hospital", "epsilon", "delta", "sigma", "q", "steps", "budget", "status"):
        out.add_column(col, justify="left" if col in ("hospital", "status") else "right", no_wrap=col != "status")
    rows = privacy["hospitals"] if privacy["mode"] == "sample" else {"all hospitals": privacy["federation"]}
    for name, r in rows.items():
        status = f"declined round {r['declined']['round']}" if "declined" in r else "ok"
        if "epsilon" not in r:
            out.add_row(name, "0", "", "", "", "0", _budget(r), status)
            continue
        out.add_row(
            name, f"{r['epsilon']:.3f}", f"{r['delta']:.1e}", f"{r['sigma']:.3f}", f"{r['sample_rate']:.4f}", str(r["steps"]), _budget(r), status
        )
    console.print(out)
    if privacy["noise"] != "system entropy":
        console.print("noise drawn from the run's seed (privacy.reproducible): these figures hold only if the seed stays secret")


def _budget(row: dict[str, Any]) -> str:
    return f"{row['budget']:g}" if row.get("budget") else "-"
