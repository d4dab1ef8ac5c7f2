"""A run's record, typed: what happened in each federated round, and the shapes of the
round records (`metrics.jsonl`) and the summary (`summary.json`) that federated runs and
the baselines share.

`RunLog` is built once, by the strategy as replies arrive; the server app, the privacy
table, the server's ledger and the checkpoint all read that one object.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from fedmed import __version__
from fedmed.config import FedmedConfig

Metrics = dict[str, Any]  # a reply's metrics as Flower carries them: `train-loss`, `dp-epsilon`, ...
NO_REPLY = "no reply in time"  # why a hospital asked to train dropped out, when it said nothing


@dataclass(frozen=True)
class Update:
    """A hospital's training reply that carries a model update."""

    metrics: Metrics
    weight: int  # its weight in the average (examples that taught something)
    update_sha256: str
    checkpoint: dict[str, Any] | None  # its signed ledger checkpoint, as it sent it
    control_sha256: str | None = None  # SCAFFOLD: the change of its control variate it sent


@dataclass(frozen=True)
class Decline:
    """A hospital that was asked to train and refused (its policy, its privacy budget)."""

    reason: str  # names settings, never patients
    privacy: Metrics  # the `dp-*` figures it reports with the refusal (empty without DP)
    checkpoint: dict[str, Any] | None


@dataclass(frozen=True)
class Evaluation:
    """A hospital's evaluation of the global model on its own test split."""

    metrics: Metrics
    checkpoint: dict[str, Any] | None


@dataclass
class RoundOutcome:
    """One round: who was asked to train, and what became of each."""

    round: int
    asked: list[str] = field(default_factory=list)
    asked_to_evaluate: list[str] = field(default_factory=list)  # the hospitals asked to evaluate this round's model
    trained: dict[str, Update] = field(default_factory=dict)
    declined: dict[str, Decline] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # asked, sent no update -> why
    evaluated: dict[str, Evaluation] = field(default_factory=dict)
    evaluation_failures: int = 0  # error replies to the evaluation request
    federated_eval: Metrics | None = None  # the hospitals' evaluations, aggregated
    selected: list[str] | None = None  # Krum, Multi-Krum, Bulyan: the hospitals whose updates the rule kept

    def hospitals(self) -> dict[str, dict[str, Metrics]]:
        """Each hospital's figures, `{"train": ..., "eval": ...}`, in the run directory's keys."""
        sites = sorted(set(self.trained) | set(self.evaluated))
        out: dict[str, dict[str, Metrics]] = {}
        for site in sites:
            phases = {}
            if site in self.trained:
                phases["train"] = strip_prefix(self.trained[site].metrics)
            if site in self.evaluated:
                phases["eval"] = strip_prefix(self.evaluated[site].metrics)
            out[site] = phases
        return out


@dataclass
class RunLog:
    """Every round of a federated run so far."""

    rounds: dict[int, RoundOutcome] = field(default_factory=dict)

    def round(self, number: int) -> RoundOutcome:
        """That round's outcome, begun if it has not been."""
        return self.rounds.setdefault(number, RoundOutcome(number))

    def latest_declines(self) -> dict[str, tuple[int, Decline]]:
        """Each hospital's last refusal, with its round."""
        out: dict[str, tuple[int, Decline]] = {}
        for number in sorted(self.rounds):
            for site, decline in self.rounds[number].declined.items():
                out[site] = (number, decline)
        return out


# ---- what the run directory records ---------------------------------------------

TEST_KEYS = (
    "accuracy", "macro_f1", "auroc", "loss", "per_class_recall", "per_class_precision", "per_class_f1", "ece", "brier", "confusion", "examples",
)  # fmt: skip
TIMING_FIELDS = ("time_s", "elapsed_s", "finished_at")  # differ between otherwise identical runs


def test_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in TEST_KEYS if k in metrics}


def strip_prefix(metrics: dict[str, Any]) -> dict[str, Any]:
    """`eval-accuracy` -> `accuracy`, `num-examples` -> `examples`: Flower's key style
    to the run directory's, so federated and baseline records use the same keys."""
    out = {}
    for key, value in metrics.items():
        for prefix in ("train-", "eval-", "num-"):
            key = key.removeprefix(prefix)
        out[key.replace("-", "_")] = value
    return out


def fairness(accuracy: dict[str, float]) -> dict[str, Any] | None:
    """How unequal the model is across hospitals (each one's accuracy on its own test
    split): the worst hospital, the gap between best and worst, the spread (std)."""
    if not accuracy:
        return None
    worst = min(sorted(accuracy), key=accuracy.__getitem__)
    values = list(accuracy.values())
    return {"worst_hospital": worst, "worst_accuracy": accuracy[worst], "best_accuracy": max(values), "gap": max(values) - min(values), "std": float(statistics.pstdev(values))}


def round_record(rnd: int, took: float, elapsed: float, test: dict[str, Any], hospitals: dict[str, Any], **extra: Any) -> dict[str, Any]:
    spread = fairness({site: phases["eval"]["accuracy"] for site, phases in hospitals.items() if "eval" in phases})
    return {
        "round": rnd,
        "time_s": round(took, 3),
        "elapsed_s": round(elapsed, 3),
        "finished_at": time.time(),
        "test": test_metrics(test),
        "hospitals": hospitals,
        **({"fairness": spread} if spread else {}),
        **extra,
    }


def summary(
    cfg: FedmedConfig, data: dict[str, Any], test: dict[str, Any], per_hospital: dict[str, Any], wall_seconds: float, **extra: Any
) -> dict[str, Any]:
    """`data`: what the run says about its data (`fedmed.data.sites.describe`)."""
    spread = fairness({site: h["accuracy"] for site, h in per_hospital.items()})
    return {
        "mode": cfg.federation.mode,
        "rounds": cfg.federation.rounds,
        "num_hospitals": cfg.data.hospitals,
        "classes": list(cfg.data.classes),
        "data": data,
        "test": test_metrics(test),
        "per_hospital": per_hospital,
        **({"fairness": spread} if spread else {}),
        "wall_seconds": round(wall_seconds, 3),
        "seed": cfg.seed,
        "config_sha256": cfg.digest(),
        "fedmed_version": __version__,
        **extra,
    }
