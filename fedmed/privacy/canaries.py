"""Canaries for the empirical privacy audit (Steinke, Nasr and Jagielski 2023, "Privacy
auditing with one (1) training run").

m synthetic images, each with a random label and each included in the first hospital's
training data with probability 1/2, drawn from a seed that hospital commits in its
ledger before training. After training, the auditor scores every canary against the
final model (how much its loss fell from the initial model's), guesses the k highest
"in" and the k lowest "out", and turns the number of correct guesses into a lower
bound on epsilon that holds with 95 % confidence. Canaries are noise, not patients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fedmed.data.sites import SiteData, Split
from fedmed.seeds import derive_seed

CANARY_HOSPITAL = 0  # index of the hospital that trains with the canaries
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Canaries:
    seed: int
    x: torch.Tensor  # (m, 1, H, W) float32 in [0, 1]
    y: torch.Tensor  # (m,) int64
    included: np.ndarray  # (m,) bool


def seed_for(run_seed: int) -> int:
    return derive_seed(run_seed, 0xCA)


def make(seed: int, m: int, size: int, num_classes: int) -> Canaries:
    """Blocky random patterns (8x8 cells of random grey levels): unlike any brain, so
    a model that memorises one shows it, and a model that does not has no clue."""
    rng = np.random.default_rng([seed, 0xCA])
    cells = rng.random((m, 1, 8, 8), dtype=np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(cells), size=(size, size), mode="nearest")
    y = torch.from_numpy(rng.integers(0, num_classes, size=m).astype("int64"))
    return Canaries(seed, x, y, rng.random(m) < 0.5)


def add_to(site: SiteData, canaries: Canaries) -> SiteData:
    """The hospital's training split with the included canaries appended (labels known)."""
    keep = torch.from_numpy(canaries.included)
    x, y = canaries.x[keep], canaries.y[keep]
    train = site.train
    possible = annotated = None
    if train.possible is not None:
        one_hot = torch.nn.functional.one_hot(y, train.possible.shape[1]).bool()
        possible = torch.cat([train.possible, one_hot])
        if train.annotated is not None:
            annotated = torch.cat([train.annotated, torch.ones_like(one_hot)])
    grown = Split(torch.cat([train.x, x]), torch.cat([train.y, y]), possible, annotated)
    return replace(site, train=grown)


@torch.no_grad()
def scores(initial: nn.Module, final: nn.Module, canaries: Canaries) -> np.ndarray:
    """How much each canary's loss fell during training: high for members."""
    loss = nn.CrossEntropyLoss(reduction="none")
    initial.eval()
    final.eval()
    return (loss(initial(canaries.x), canaries.y) - loss(final(canaries.x), canaries.y)).numpy()


def guesses(score: np.ndarray, included: np.ndarray, k: int) -> tuple[int, int]:
    """Guess "in" for the k highest scores and "out" for the k lowest: (guesses, correct)."""
    order = np.argsort(-score, kind="stable")
    top, bottom = order[:k], order[len(order) - k :]
    return 2 * k, int(included[top].sum() + (~included[bottom]).sum())


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP (Steinke et al.,
    the binomial tail plus their 2 m delta term for approximate DP)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    from scipy import stats  # a second to import: only when scoring

    q = 1 / (1 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon the guesses rule out at `confidence` (0 when they rule out none)."""
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, high * 2
        if high > 1e3:
            return math.inf
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low
