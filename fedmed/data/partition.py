"""Who gets which image: the train/test split and the hospitals, by patient.

A patient's slices (one volume, one DICOM series, one patient folder) always stay
together: in one split and at one hospital. Identical images count as one patient,
so a copy can never sit on both sides of the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmed.config import DataConfig, SkewConfig
from fedmed.data.dataset import Dataset
from fedmed.data.skew import deal, share_matrix
from fedmed.errors import FedmedError

TRAIN, TEST, LEFT_OUT = 0, 1, -1


@dataclass(frozen=True)
class Assignment:
    split: np.ndarray  # (N,) int8: TRAIN, TEST, or LEFT_OUT (a test copy of a training image)
    site: np.ndarray  # (N,) int16 hospital index
    duplicates: dict[str, int]

    def indices(self, split: int, site: int | None = None) -> np.ndarray:
        mask = self.split == split
        if site is not None:
            mask &= self.site == site
        return np.flatnonzero(mask)


def merged_patients(ds: Dataset) -> np.ndarray:
    """Patient group per image, where patients sharing an identical image are one group."""
    _, group = np.unique(ds.patient, return_inverse=True)
    parent = np.arange(group.max() + 1 if len(group) else 0)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = np.argsort(ds.hashes, kind="stable")
    ordered = ds.hashes[order]
    same = np.flatnonzero((ordered[1:] == ordered[:-1]) & (ordered[1:] != 0))  # 0: a blank image
    for k in same:
        a, b = root(group[order[k]]), root(group[order[k + 1]])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.asarray([root(g) for g in group], dtype=np.int64)


def _random_split(groups: np.ndarray, strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """TEST for whole groups holding about `fraction` of each stratum's images (a class,
    at a hospital), else TRAIN. A group counts in the stratum of its first image; every
    stratum keeps a training group."""
    unique, first, sizes = np.unique(groups, return_index=True, return_counts=True)
    test_groups = []
    for stratum in np.unique(strata[first]):
        mine = np.flatnonzero(strata[first] == stratum)
        order = mine[rng.permutation(len(mine))]
        taken = np.cumsum(sizes[order])
        n_test = int(np.argmin(np.abs(taken - fraction * taken[-1]))) + 1  # the closest to the share
        test_groups.extend(unique[order[: min(n_test, len(order) - 1)]])
    return np.where(np.isin(groups, test_groups), TEST, TRAIN).astype(np.int8)


def split_by_patient(ds: Dataset, data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(split, patient group, duplicate counts): the layout's split where it gives one,
    otherwise whole patients drawn at random for the test side."""
    groups = merged_patients(ds)
    split = ds.split.copy()
    unsplit = split < 0
    if unsplit.any():
        strata = (ds.site[unsplit].astype(np.int64) + 1) * 1000 + ds.labels[unsplit]
        split[unsplit] = _random_split(groups[unsplit], strata, data.test_fraction, np.random.default_rng([seed, 11]))
    hashed = ds.hashes != 0  # blank images are not copies of anything
    train_hashes = set(ds.hashes[(split == TRAIN) & hashed].tolist())
    test_idx = np.flatnonzero((split == TEST) & hashed)
    copies = np.asarray([h in train_hashes for h in ds.hashes[test_idx].tolist()], dtype=bool)
    duplicates = {
        "train_test": int(copies.sum()),
        "within_train": int(((split == TRAIN) & hashed).sum() - len(train_hashes)),
        "within_test": int(len(test_idx) - len(set(ds.hashes[test_idx].tolist()))),
        "left_out": 0,
    }
    if data.dedupe and copies.any():
        split[test_idx[copies]] = LEFT_OUT
        duplicates["left_out"] = int(copies.sum())
    return split, groups, duplicates


def assign(ds: Dataset, data: DataConfig, skew: SkewConfig, seed: int) -> Assignment:
    split, groups, duplicates = split_by_patient(ds, data, seed)
    if data.partition == "folders":
        if (skew.labels, skew.quantity) != ("iid", "equal"):
            raise FedmedError("skew.labels and skew.quantity share out a pool: they need data.partition = pool, not folders")
        sites = ds.manifest.get("sites", [])
        if not sites:
            raise FedmedError(
                "data.partition = folders needs one top folder per hospital (ROOT/<hospital>/<class>/...), "
                "but the top folders are classes or splits: use data.partition = pool"
            )
        if len(sites) != data.hospitals:
            raise FedmedError(f"data.path has {len(sites)} hospital folders but data.hospitals = {data.hospitals}: set data.hospitals = {len(sites)}")
        result = Assignment(split, ds.site.copy(), duplicates)
    else:
        result = Assignment(split, _deal(ds, data, skew, seed, split, groups), duplicates)
    short = _shortfall(result, data.hospitals, skew, data.partition)
    if short is None:
        return result
    advice = "lower data.hospitals"
    if data.partition == "pool" and (works := _most_hospitals(ds, data, skew, seed, split, groups)):
        advice += f" to {works} or fewer"
    if short.startswith("dealt"):
        advice = f"lower skew.min_size, {advice}, or soften the skew"
    elif "no test" in short:
        advice += " or raise data.test_fraction"
    raise FedmedError(f"{short}: {advice}")


def _deal(ds: Dataset, data: DataConfig, skew: SkewConfig, seed: int, split: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each image's hospital, whole patients dealt out of the pool (-1: a class no hospital holds)."""
    supply = np.bincount(ds.labels[split == TRAIN], minlength=data.num_classes)
    shares = share_matrix(skew, data.hospitals, supply, seed)
    site = np.full(len(ds), -1, dtype=np.int16)
    for part in (TRAIN, TEST):
        mask = split == part
        if mask.any():
            site[mask] = deal(groups[mask], ds.labels[mask], shares, np.random.default_rng([seed, 12, part]))
    return site


def _shortfall(result: Assignment, hospitals: int, skew: SkewConfig, partition: str) -> str | None:
    """Why the assignment cannot serve every hospital, if it cannot."""
    counts = {part: np.bincount(result.site[(result.split == part) & (result.site >= 0)], minlength=hospitals) for part in (TRAIN, TEST)}
    skewed = (skew.labels, skew.quantity) != ("iid", "equal")
    if skewed and partition == "pool" and counts[TRAIN].min() < skew.min_size:
        return f"dealt as whole patients, a hospital gets {counts[TRAIN].min()} training images, under skew.min_size = {skew.min_size}"
    for part, name in ((TRAIN, "training"), (TEST, "test")):
        empty = np.flatnonzero(counts[part] == 0)
        if len(empty):
            total = int((result.split == part).sum())
            return f"hospital {empty[0] + 1} of {hospitals} would get no {name} images ({total} {name} images, shared out by patient)"
    return None


def _most_hospitals(ds: Dataset, data: DataConfig, skew: SkewConfig, seed: int, split: np.ndarray, groups: np.ndarray) -> int:
    """A number of hospitals under `data.hospitals` that the pool serves, by bisection
    (0: none): the largest where fewer hospitals always fare no worse, as with IID
    dealing; with skew, each number draws its own shares, and it is one that works."""

    def serves(n: int) -> bool:
        fewer = data.model_copy(update={"hospitals": n})
        return _shortfall(Assignment(split, _deal(ds, fewer, skew, seed, split, groups), {}), n, skew, "pool") is None

    lo, hi = 0, data.hospitals - 1  # serves(lo) holds (or lo is 0); find the largest n <= hi that serves
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if serves(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
