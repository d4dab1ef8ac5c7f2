"""Privacy accounting over a whole run: a history of (sigma, sample rate, steps) that
survives from round to round, and sigma calibrated once for the planned total.

Opacus's accountants do the mathematics; this module only keeps their history in a
form Flower can store (node state on a hospital, the server's memory for client DP).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedmed.errors import FedmedError

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}
TOLERANCE = 0.01  # calibration stops when epsilon is within this below the target


def default_delta(n: int) -> float:
    """Well below 1/n, the usual ceiling for a meaningful delta."""
    return min(1e-5, 0.1 / n)


def check_delta(delta: float, n: int, unit: str) -> float:
    """The delta to use for `n` records (`unit` names them in the error)."""
    if delta == 0:
        return default_delta(n)
    if delta >= 1 / n:
        raise FedmedError(
            f"privacy.delta = {delta:g} is not below 1/n = {1 / n:.3g} for {n} {unit}: "
            f"set privacy.delta lower (or 0 for min(1e-5, 0.1/n))"
        )
    return delta


@dataclass
class StepHistory:
    """Every private step taken so far: (noise multiplier, sample rate, steps) entries."""

    kind: str
    entries: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, sigma: float, rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if self.entries and self.entries[-1][:2] == (sigma, rate):
            s, q, k = self.entries[-1]
            self.entries[-1] = (s, q, k + steps)
        else:
            self.entries.append((sigma, rate, steps))

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.kind, tuple(self.entries), delta)

    def epsilon_after(self, sigma: float, rate: float, steps: int, delta: float) -> float:
        """Epsilon if `steps` more steps were taken (what a budget check asks)."""
        trial = StepHistory(self.kind, list(self.entries))
        trial.add(sigma, rate, steps)
        return trial.epsilon(delta)

    @property
    def steps(self) -> int:
        return sum(k for _, _, k in self.entries)

    def to_record(self) -> dict[str, list]:
        return {
            "sigma": [s for s, _, _ in self.entries],
            "sample-rate": [q for _, q, _ in self.entries],
            "steps": [k for _, _, k in self.entries],
        }

    @classmethod
    def from_record(cls, kind: str, record: dict | None) -> StepHistory:
        if not record:
            return cls(kind)
        entries = zip(record["sigma"], record["sample-rate"], record["steps"], strict=True)
        return cls(kind, [(float(s), float(q), int(k)) for s, q, k in entries])


@lru_cache(maxsize=256)
def epsilon_of(kind: str, entries: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not entries:
        return 0.0
    accountant = ACCOUNTANTS[kind]()
    accountant.history = list(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP: "optimal order is the largest alpha" (the bound is still valid)
        try:
            return float(accountant.get_epsilon(delta))
        except (ValueError, OverflowError, MemoryError):  # so little noise that PRV's grid cannot hold it
            return math.inf


@lru_cache(maxsize=64)
def calibrate(kind: str, epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The smallest sigma (within TOLERANCE) whose epsilon after `steps` steps at sample
    rate `rate` is at most `epsilon`: calibrated once, for the whole planned run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant=kind, epsilon_tolerance=TOLERANCE
                )
            )
        except ValueError as exc:
            raise FedmedError(f"privacy.epsilon = {epsilon:g} cannot be reached at delta {delta:g}: {exc}") from None
