"""A hospital's lifetime privacy budget: every DP-SGD step it ever took on one dataset,
over every run and whatever run id the server used, in a signed, hash-chained ledger of
its own (`LEDGER_DIR/budget/<site>-<commitment>.jsonl`). The hospital composes all of it
with the accountant before it agrees to train (`site.max_epsilon` is a lifetime cap).

A budget file that does not verify is never read as empty: the hospital declines to
train until someone looks at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.ledger.chain import LedgerFile, LedgerWriter
from fedmed.ledger.keys import Signer

DATASET, SPEND = "dataset", "spend"  # the first record (the full commitment), then one per DP round


@dataclass(frozen=True)
class Spend:
    run: str  # the ledger run id the server used
    round: int
    sigma: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float


def budget_file(root: Path, site: str, commitment: str) -> Path:
    return root / "budget" / f"{site}-{commitment[:16]}.jsonl"


def read_spends(path: Path, site: str, public: Ed25519PublicKey) -> tuple[str, list[Spend]]:
    """(the dataset's full commitment, every spend) from a budget file, verified against
    the hospital's key: FedmedError (naming the file) if it does not verify."""
    ledger = LedgerFile.read(path)
    records = [r for r in ledger.records if r is not None]
    problems = ledger.problems(site, public)
    if not problems and (not records or records[0]["event"] != DATASET):
        problems = ["it does not start with its dataset record"]
    if problems:
        raise FedmedError(f"lifetime privacy budget {path} does not verify ({problems[0]}): it is kept as it is; restore it from a backup, or ask your privacy officer")
    spends = [
        Spend(str(p["run"]), int(r["round"]), float(p["sigma"]), float(p["sample_rate"]), int(p["steps"]), str(p["accountant"]), float(p["delta"]))
        for r in records[1:]
        if r["event"] == SPEND
        for p in [r["payload"]]
    ]
    return str(records[0]["payload"]["data_commitment"]), spends


class LifetimeBudget:
    """One dataset's budget ledger, read and verified once per request."""

    def __init__(self, writer: LedgerWriter, spends: list[Spend]) -> None:
        self.writer, self.spends = writer, spends

    @classmethod
    def open(cls, root: Path, signer: Signer, commitment: str) -> LifetimeBudget:
        path = budget_file(root, signer.party, commitment)
        if not path.exists():
            writer = LedgerWriter(path, signer, "lifetime")
            writer.append(DATASET, 0, {"data_commitment": commitment})
            return cls(writer, [])
        found, spends = read_spends(path, signer.party, signer.public)
        if found != commitment:
            raise FedmedError(f"lifetime privacy budget {path} belongs to another dataset: it is kept as it is; ask your privacy officer")
        return cls(LedgerWriter(path, signer, "lifetime"), spends)

    def entries(self) -> list[tuple[float, float, int]]:
        """(sigma, sample rate, steps) of every DP round, for the accountant."""
        return [(s.sigma, s.sample_rate, s.steps) for s in self.spends]

    def spend(self, spend: Spend) -> None:
        """Recorded before the update leaves: a round is counted even if its reply is lost."""
        self.writer.append(SPEND, spend.round, {
            "run": spend.run, "sigma": spend.sigma, "sample_rate": spend.sample_rate, "steps": spend.steps,
            "accountant": spend.accountant, "delta": spend.delta,
        })
        self.spends.append(spend)
