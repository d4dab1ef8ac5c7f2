"""What one hospital (or the server's global test) trains and evaluates on, as tensors.

Loaded once per process and kept: Flower rebuilds a ClientApp for every message,
but the Ray actor (or SuperNode) process that runs it lives across rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from fedmed.config import DataConfig, FedmedConfig, SkewConfig
from fedmed.data import demo
from fedmed.data.dataset import Dataset, load_dataset, usable
from fedmed.data.labels import knowledge
from fedmed.data.partition import TEST, TRAIN, Assignment, assign
from fedmed.data.phantom import acquire
from fedmed.data.scanners import hospital_profiles
from fedmed.errors import FedmedError


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64; -1 where the label is not known exactly (partial labels)
    possible: torch.Tensor | None = None  # (N, C) bool: the classes an image may be; None: y is all known
    annotated: torch.Tensor | None = None  # (N, C) bool: the classes its hospital annotates

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class SiteData:
    name: str
    index: int
    train: Split
    test: Split
    val: Split | None = None  # `data.val_fraction` of its training patients, for choosing settings


VAL_STREAM = 11  # the seed stream that draws each hospital's validation patients


def hold_out(train: Split, patients: np.ndarray, fraction: float, seed: int, index: int) -> tuple[Split, Split | None]:
    """(what the hospital trains on, its validation split): `fraction` of its training
    patients, drawn from the seed, with all their images (none of a patient's images on
    both sides); at least one patient, and at least one left to train on."""
    unique = np.unique(patients)
    k = min(len(unique) - 1, max(1, round(fraction * len(unique)))) if fraction > 0 else 0
    if k <= 0:
        return train, None
    held = np.random.default_rng([seed, index, VAL_STREAM]).choice(unique, size=k, replace=False)
    val = np.isin(patients, held)
    keep, out = torch.from_numpy(~val), torch.from_numpy(val)
    return Split(train.x[keep], train.y[keep]), Split(train.x[out], train.y[out])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


def _split(images: demo.ImageSet) -> Split:
    return Split(to_tensor(images.images), torch.from_numpy(images.labels.astype("int64")))


def _spec(cfg: FedmedConfig) -> demo.DemoSpec:
    return _demo_spec(cfg.data, cfg.seed, cfg.skew)


@lru_cache(maxsize=4)  # skewed specs draw their shares (with redraws): once per process
def _demo_spec(data: DataConfig, seed: int, skew: SkewConfig) -> demo.DemoSpec:
    return demo.DemoSpec.from_config(data, seed, skew)


def _demo_site(spec: demo.DemoSpec, cache_dir: str, index: int) -> tuple[SiteData, np.ndarray]:
    """A demo hospital, and its training images' patients (each image its own: the demo's
    images are drawn independently)."""
    train, test = demo.hospital(spec, cache_dir, index)
    return SiteData(name=demo.hospital_name(index), index=index, train=_split(train), test=_split(test)), np.arange(len(train.labels))


_DATASETS: dict[DataConfig, Dataset] = {}


def _dataset(data: DataConfig, announce: Callable[[str], None] | None = None) -> Dataset:
    """The dataset on disk, listed and read once per process."""
    if data not in _DATASETS:
        _DATASETS[data] = load_dataset(data, announce)
    return _DATASETS[data]


@lru_cache(maxsize=2)
def _disk(data: DataConfig, skew: SkewConfig, seed: int) -> tuple[Dataset, Assignment, tuple[str, ...]]:
    dataset = _dataset(data)
    warnings = usable(dataset, data)
    return dataset, assign(dataset, data, skew, seed), tuple(warnings)


@lru_cache(maxsize=2)
def _disk_global_test(data: DataConfig, skew: SkewConfig, seed: int) -> Split:
    """Every test image; with simulated scanners, spread over all hospitals' scanners."""
    dataset, parts, _ = _disk(data, skew, seed)
    idx = parts.indices(TEST)
    images = np.array(dataset.images[idx])
    if skew.scanners == "simulated":
        for h in range(data.hospitals):
            images[h :: data.hospitals] = _rescan(images[h :: data.hospitals], data, seed, h, stream=6)
    return Split(to_tensor(images), torch.from_numpy(dataset.labels[idx]))


def _rescan(images: np.ndarray, data: DataConfig, seed: int, index: int, stream: int = 5) -> np.ndarray:
    """Images re-acquired with hospital `index`'s simulated scanner (skew.scanners = simulated)."""
    profile = hospital_profiles(data.hospitals, seed)[index]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = acquire(image.astype(np.float32) / 255.0, data.image_size, profile, np.random.default_rng([seed, index, i, stream]))
    return out


def _disk_site(data: DataConfig, skew: SkewConfig, seed: int, index: int) -> tuple[SiteData, np.ndarray]:
    """A hospital of the dataset on disk, and its training images' patients."""
    dataset, parts, _ = _disk(data, skew, seed)

    def take(split: int) -> Split:
        idx = parts.indices(split, index)
        images = np.asarray(dataset.images[idx])
        if skew.scanners == "simulated":
            images = _rescan(images, data, seed, index)
        return Split(to_tensor(images), torch.from_numpy(dataset.labels[idx]))

    patients = np.asarray(dataset.patient[parts.indices(TRAIN, index)])
    return SiteData(name=demo.hospital_name(index), index=index, train=take(TRAIN), test=take(TEST)), patients


@lru_cache(maxsize=64)  # the hospitals this process serves, reused across rounds; bounded, for federations of thousands
def site_data(cfg: FedmedConfig, index: int) -> SiteData:
    """Hospital `index` of the configured dataset, with what it knows of its labels."""
    if not 0 <= index < cfg.data.hospitals:
        raise FedmedError(
            f"hospital index {index} is outside 0..{cfg.data.hospitals - 1} (data.hospitals)"
        )
    if cfg.data.source == "disk":
        site, patients = _disk_site(cfg.data, cfg.skew, cfg.seed, index)
    else:
        site, patients = _demo_site(_spec(cfg), cfg.data.cache_dir, index)
    if cfg.data.val_fraction:
        train, val = hold_out(site.train, patients, cfg.data.val_fraction, cfg.seed, index)
        site = replace(site, train=train, val=val)
    known = knowledge(cfg, index, site.train.y)
    if known is None:
        return site
    return replace(site, train=Split(site.train.x, known.y, known.possible, known.annotated))


@lru_cache(maxsize=2)
def _demo_global_test(spec: demo.DemoSpec, cache_dir: str) -> Split:
    return _split(demo.global_test(spec, cache_dir))


def global_test(cfg: FedmedConfig) -> Split:
    """The held-out test set the server evaluates the global model on (on disk data:
    every hospital's test images together)."""
    if cfg.data.source == "disk":
        return _disk_global_test(cfg.data, cfg.skew, cfg.seed)
    return _demo_global_test(_spec(cfg), cfg.data.cache_dir)


def forget() -> None:
    """Drop the data this process keeps for a run: a process that serves run after run
    (a sweep's, its Ray actors) holds one run's at a time, as a fresh process would."""
    for cached in (_demo_spec, _disk, _disk_global_test, site_data, _demo_global_test):
        cached.cache_clear()
    _DATASETS.clear()


def train_sizes(cfg: FedmedConfig) -> list[int]:
    """Each hospital's number of training images, without loading (or making) any."""
    if cfg.data.source == "disk":
        _, parts, _ = _disk(cfg.data, cfg.skew, cfg.seed)
        return np.bincount(parts.site[(parts.split == TRAIN) & (parts.site >= 0)], minlength=cfg.data.hospitals).tolist()
    spec = _spec(cfg)
    return [sum(row) for row in spec.train_counts] if spec.train_counts else [spec.train_per_hospital] * spec.hospitals


def ensure_data(cfg: FedmedConfig, announce: Callable[[str], None] | None = None) -> None:
    """Decode and cache a dataset on disk now, and check it can be split across the
    hospitals, so no round fails on it; of the demo data, the global test set (each
    hospital's images are made when it is first asked)."""
    if cfg.data.source == "disk":
        _dataset(cfg.data, announce)  # announces a first-time decode
        _, parts, warnings = _disk(cfg.data, cfg.skew, cfg.seed)
        for line in warnings:
            (announce or print)(f"warning: {line}; `fedmed data check {cfg.data.path}` shows the details")
        if parts.duplicates["left_out"]:
            (announce or print)(f"note: {parts.duplicates['left_out']} test images duplicate training images and are left out (data.dedupe)")
        return
    demo.ensure_cached(_spec(cfg), cfg.data.cache_dir, announce)


def describe(cfg: FedmedConfig) -> dict:
    """What a run's summary says about its data: counts and a digest, never names or paths."""
    if cfg.data.source != "disk":
        return {"source": "demo", "digest": _spec(cfg).digest()}
    dataset, parts, _ = _disk(cfg.data, cfg.skew, cfg.seed)
    return {
        "source": "disk",
        "format": dataset.manifest["format"],
        "digest": dataset.manifest["digest"],
        "images": len(dataset),
        "train": int((parts.split == TRAIN).sum()),
        "test": int((parts.split == TEST).sum()),
        "duplicates": parts.duplicates,
        "skipped_files": sum(dataset.skip_counts(include_system=False).values()),
    }
