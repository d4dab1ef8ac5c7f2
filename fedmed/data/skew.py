"""How a pool of images is shared out among hospitals: label skew, quantity skew,
composed, with a minimum size per hospital (NIID-Bench, Li et al. 2022).

The result is a share matrix S (hospitals x classes): S[h, c] is the fraction of
class c's images that hospital h receives; every column sums to 1 (or to 0 for a
class no hospital holds). The demo generator renders counts from it and datasets
on disk deal whole patients by it, so both get the same kinds of skew.
"""

from __future__ import annotations

import numpy as np

from fedmed.config import SkewConfig
from fedmed.errors import FedmedError

MAX_DRAWS = 1000  # redraws allowed to meet skew.min_size before giving up


def _label_shares(skew: SkewConfig, hospitals: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    if skew.labels == "iid":
        return np.ones((hospitals, classes))
    if skew.labels == "dirichlet":
        # per class, its images spread over the hospitals by Dirichlet(beta)
        return rng.dirichlet(np.full(hospitals, skew.beta), size=classes).T
    k = skew.classes_per_hospital
    held = np.zeros((hospitals, classes))
    for h in range(hospitals):  # #C=k: hospital h holds class h mod C, plus k-1 others at random
        first = h % classes
        others = rng.choice([c for c in range(classes) if c != first], size=k - 1, replace=False)
        held[h, [first, *others]] = 1.0
    return held


def _quantity_weights(skew: SkewConfig, hospitals: int, rng: np.random.Generator) -> np.ndarray:
    if skew.quantity == "equal":
        return np.ones(hospitals)
    if skew.quantity == "dirichlet":
        return rng.dirichlet(np.full(hospitals, skew.quantity_beta))
    ranks = rng.permutation(hospitals) + 1  # power law: sizes fall as rank^-power, ranks shuffled
    return ranks.astype(float) ** -skew.power


def validate(skew: SkewConfig, hospitals: int, classes: int) -> None:
    if skew.labels == "classes" and skew.classes_per_hospital > classes:
        raise FedmedError(
            f"skew.classes_per_hospital = {skew.classes_per_hospital} but there are only {classes} classes: "
            f"choose 1..{classes}"
        )


def counts(shares: np.ndarray, supply: np.ndarray) -> np.ndarray:
    """Images per hospital and class (integers) when class c has supply[c] images:
    largest-remainder rounding of shares x supply, so every column sums exactly."""
    exact = shares * supply[None, :]
    out = np.floor(exact).astype(np.int64)
    for c in range(shares.shape[1]):
        short = int(round(shares[:, c].sum() * supply[c])) - int(out[:, c].sum())
        if short > 0:
            order = np.argsort(-(exact[:, c] - out[:, c]), kind="stable")
            out[order[:short], c] += 1
    return out


def share_matrix(skew: SkewConfig, hospitals: int, supply: np.ndarray, seed: int) -> np.ndarray:
    """Shares (hospitals x classes), redrawn until every hospital gets skew.min_size
    training images out of `supply` (images per class)."""
    classes = len(supply)
    validate(skew, hospitals, classes)
    if (skew.labels, skew.quantity) == ("iid", "equal"):
        return np.full((hospitals, classes), 1.0 / hospitals)  # nothing to draw: equal shares
    if supply.sum() < hospitals * skew.min_size:
        raise FedmedError(
            f"{int(supply.sum())} training images cannot give {hospitals} hospitals {skew.min_size} each "
            "(skew.min_size): lower data.hospitals or skew.min_size"
        )
    rng = np.random.default_rng([seed, 23])
    for _ in range(MAX_DRAWS):
        raw = _label_shares(skew, hospitals, classes, rng) * _quantity_weights(skew, hospitals, rng)[:, None]
        total = raw.sum(axis=0, keepdims=True)
        shares = np.divide(raw, total, out=np.zeros_like(raw), where=total > 0)
        if counts(shares, supply).sum(axis=1).min() >= skew.min_size:
            return shares
    raise FedmedError(
        f"could not give every hospital {skew.min_size} training images in {MAX_DRAWS} draws "
        f"with these skew settings: raise skew.beta or skew.quantity_beta, or lower skew.min_size or data.hospitals"
    )


def deal(groups: np.ndarray, labels: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hospital per image (-1: its class is held by none). Whole patients, in random
    order, each to the hospital furthest below its share of that class; among ties, the
    one holding fewest images (a patient counts under their first image's class)."""
    unique, first, inverse, sizes = np.unique(groups, return_index=True, return_inverse=True, return_counts=True)
    group_label = labels[first]
    supply = np.bincount(group_label, weights=sizes, minlength=shares.shape[1])
    target = shares * supply[None, :]
    got = np.zeros_like(target)
    load = np.zeros(shares.shape[0])
    owner = np.full(len(unique), -1, dtype=np.int16)
    for g in rng.permutation(len(unique)):
        c = group_label[g]
        holders = np.flatnonzero(shares[:, c] > 0)
        if len(holders) == 0:
            continue
        deficit = target[holders, c] - got[holders, c]
        near = holders[deficit >= deficit.max() - 1e-9]
        h = near[np.argmin(load[near])]
        owner[g] = h
        got[h, c] += sizes[g]
        load[h] += sizes[g]
    return owner[inverse]
