"""`fedmed site budget`: what this hospital has spent of its lifetime privacy budget, per
dataset (its data as committed to), and the runs that spent it, from its own signed
budget ledgers (`fedmed.ledger.budget`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmed.config import FedmedConfig
from fedmed.errors import FedmedError
from fedmed.federation.client_app import hospital_data
from fedmed.ledger.budget import Dataset, Spend, history_of, read_spends
from fedmed.ledger.digests import data_commitment
from fedmed.ledger.keys import load_public, read_data_secret


def report(cfg: FedmedConfig, config_path: Path, console: Console) -> int:
    """Print spent and remaining per dataset; 1 if a budget ledger does not verify."""
    name, cap = cfg.site.name, cfg.site.max_epsilon
    if not name:
        raise FedmedError(f"{config_path} has no site.name: pass the hospital's site config")
    root = Path(cfg.site.ledger_dir).expanduser()
    files = sorted((root / "budget").glob(f"{name}-*.jsonl"))
    limit = f"lifetime cap {cap:g} (site.max_epsilon)" if cap else "no lifetime cap (site.max_epsilon = 0)"
    if not files:
        console.print(f"{name}: no DP-SGD training recorded in {root} yet; {limit}")
        return 0
    public = load_public(root / "keys" / f"{name}.pub")
    current = _current(cfg, root)
    console.print(f"{name}: privacy spent on each dataset it trained on, over all runs; {limit}")
    failed = False
    for path in files:
        try:
            dataset, spends = read_spends(path, name, public)
        except FedmedError as exc:
            console.print(f"[red]{exc}[/red]")
            failed = True
            continue
        console.print(_table(dataset, spends, cap, dataset.commitment == current))
    return 1 if failed else 0


def _table(dataset: Dataset, spends: list[Spend], cap: float, current: bool) -> Table:
    total = _epsilon(dataset, spends)
    left = f", {max(cap - total, 0.0):.3f} left" if cap else ""
    title = (
        f"dataset {dataset.commitment[:16]}{' (its data now)' if current else ''}: epsilon {total:.3f} spent"
        f" ({dataset.accountant}, delta {dataset.delta:.1e}){left}"
    )
    table = Table("run", "rounds", "steps", "epsilon of the run alone", title=title)
    for run in dict.fromkeys(s.run for s in spends):
        mine = [s for s in spends if s.run == run]
        rounds = sorted({s.round for s in mine})
        table.add_row(run, f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else str(rounds[0]), str(sum(s.steps for s in mine)), f"{_epsilon(dataset, mine):.3f}")
    return table


def _epsilon(dataset: Dataset, spends: list[Spend]) -> float:
    return history_of(dataset, spends).epsilon(dataset.delta)


def _current(cfg: FedmedConfig, root: Path) -> str | None:
    """The commitment to this node's data as it is now (None if it cannot be read)."""
    secret = root / "keys" / f"{cfg.site.name}.data-secret"
    try:
        site, _ = hospital_data(cfg, cfg, 0)
        return data_commitment(read_data_secret(secret), site.train.x, site.train.y, site.test.x, site.test.y)
    except (OSError, FedmedError):
        return None
