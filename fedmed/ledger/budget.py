"""A hospital's lifetime privacy budget: every DP-SGD step it ever took on one dataset,
over every run and whatever run id the server used, in a signed, hash-chained ledger of
its own (`LEDGER_DIR/budget/<site>-<commitment>.jsonl`). The hospital composes all of it
before it agrees to train (`site.max_epsilon` is a lifetime cap), with an accountant and
a delta fixed when the dataset was first seen: a server cannot loosen the sum by asking
for another.

A budget file that does not verify is never read as empty: the hospital declines to
train until someone looks at it. Each run ledger's training record holds the budget
ledger's checkpoint after that round's spend, so a budget ledger that was deleted, or
cut short by whole records, is caught too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.ledger.chain import LedgerFile, LedgerWriter, line_hash
from fedmed.ledger.keys import Signer

if TYPE_CHECKING:
    from fedmed.privacy.accounting import StepHistory

class BudgetLedgerError(FedmedError):
    """A lifetime budget ledger that cannot be trusted: the hospital declines to train."""


DATASET, SPEND = "dataset", "spend"  # the first record (the dataset's terms), then one per DP round
ACCOUNTANT = "prv"  # the lifetime sum's accountant: the tight one


@dataclass(frozen=True)
class Dataset:
    """The terms a budget ledger was opened on, in its first record."""

    commitment: str  # the full data commitment
    accountant: str
    delta: float  # min(1e-5, 0.1/n) for its n training images


@dataclass(frozen=True)
class Spend:
    run: str  # the ledger run id the server used
    round: int
    sigma: float
    sample_rate: float
    steps: int


def budget_file(root: Path, site: str, commitment: str) -> Path:
    return root / "budget" / f"{site}-{commitment[:16]}.jsonl"


def read_spends(path: Path, site: str, public: Ed25519PublicKey) -> tuple[Dataset, list[Spend]]:
    """A budget file's terms and every spend, verified against the hospital's key:
    BudgetLedgerError (naming the file) if it does not verify."""
    return _verified(LedgerFile.read(path), site, public)


def _verified(ledger: LedgerFile, site: str, public: Ed25519PublicKey) -> tuple[Dataset, list[Spend]]:
    records = [r for r in ledger.records if r is not None]
    problems = ledger.problems(site, public)
    if not problems and (not records or records[0]["event"] != DATASET):
        problems = ["it does not start with its dataset record"]
    if problems:
        raise BudgetLedgerError(f"lifetime privacy budget {ledger.path} does not verify ({problems[0]}): it is kept as it is; ask your privacy officer")
    terms = records[0]["payload"]
    spends = [
        Spend(str(p["run"]), int(r["round"]), float(p["sigma"]), float(p["sample_rate"]), int(p["steps"]))
        for r in records[1:]
        if r["event"] == SPEND
        for p in [r["payload"]]
    ]
    return Dataset(str(terms["data_commitment"]), str(terms["accountant"]), float(terms["delta"])), spends


def history_of(dataset: Dataset, spends: list[Spend]) -> StepHistory:
    """Spends composed as the hospital composes them: with the dataset's accountant (and
    read at its delta)."""
    from fedmed.privacy.accounting import StepHistory  # Opacus: imported by DP requests only

    history = StepHistory(dataset.accountant)
    for s in spends:
        history.add(s.sigma, s.sample_rate, s.steps)
    return history


def checkpoints_recorded(root: Path, site: str, path: Path) -> tuple[int, str] | None:
    """The latest checkpoint (record number, head hash) of budget ledger `path` that any of
    this hospital's run ledgers recorded."""
    latest: tuple[int, str] | None = None
    for run in root.glob(f"*/{site}.jsonl"):
        for record in LedgerFile.read(run).records:
            mark = ((record or {}).get("payload", {}).get("privacy") or {}).get("lifetime_checkpoint") or {}
            if mark.get("budget") == path.name and (latest is None or int(mark["seq"]) > latest[0]):
                latest = (int(mark["seq"]), str(mark["head"]))
    return latest


class LifetimeBudget:
    """One dataset's budget ledger, read and verified once per request."""

    def __init__(self, writer: LedgerWriter, dataset: Dataset, spends: list[Spend]) -> None:
        self.writer, self.dataset, self.spends = writer, dataset, spends

    @classmethod
    def open(cls, root: Path, signer: Signer, commitment: str, n: int) -> LifetimeBudget:
        """The budget ledger of the data committed to (`n` training images), created on
        first use; BudgetLedgerError if it does not verify or is not what the run ledgers recorded."""
        try:
            return cls._open(root, signer, commitment, n)
        except BudgetLedgerError:
            raise
        except (FedmedError, OSError, ValueError, KeyError, TypeError) as exc:  # a torn or malformed file, an unreadable one
            raise BudgetLedgerError(f"lifetime privacy budget of {commitment[:16]} under {root} cannot be read ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _open(cls, root: Path, signer: Signer, commitment: str, n: int) -> LifetimeBudget:
        path = budget_file(root, signer.party, commitment)
        recorded = checkpoints_recorded(root, signer.party, path)
        from fedmed.privacy.accounting import default_delta  # Opacus: imported by DP requests only

        if not path.exists():
            if recorded is not None:
                raise BudgetLedgerError(f"lifetime privacy budget {path} is missing, though this hospital's run ledgers record spending in it: restore it; ask your privacy officer")
            dataset = Dataset(commitment, ACCOUNTANT, default_delta(n))
            writer = LedgerWriter(path, signer, "lifetime")
            writer.append(DATASET, 0, {"data_commitment": commitment, "accountant": dataset.accountant, "delta": dataset.delta})
            return cls(writer, dataset, [])
        ledger = LedgerFile.read(path)
        dataset, spends = _verified(ledger, signer.party, signer.public)
        if dataset.commitment != commitment:
            raise BudgetLedgerError(f"lifetime privacy budget {path} belongs to another dataset: it is kept as it is; ask your privacy officer")
        if recorded is not None and (recorded[0] >= len(ledger.lines) or line_hash(ledger.lines[recorded[0]]) != recorded[1]):
            raise BudgetLedgerError(f"lifetime privacy budget {path} is shorter than, or differs from, what this hospital's run ledgers recorded: it was cut or replaced; ask your privacy officer")
        return cls(LedgerWriter(path, signer, "lifetime"), dataset, spends)

    def history(self) -> StepHistory:
        """Every DP round on this data, for the accountant fixed with the dataset."""
        return history_of(self.dataset, self.spends)

    def spend(self, spend: Spend) -> dict[str, object]:
        """Recorded before the update leaves (a round counts even if its reply is lost);
        returns the checkpoint for the run ledger's training record."""
        self.writer.append(SPEND, spend.round, {"run": spend.run, "sigma": spend.sigma, "sample_rate": spend.sample_rate, "steps": spend.steps})
        self.spends.append(spend)
        return {"budget": self.writer.path.name, "seq": self.writer.seq - 1, "head": self.writer.head}
