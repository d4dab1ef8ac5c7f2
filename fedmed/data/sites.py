"""What one hospital (or the server's global test) trains and evaluates on, as tensors.

Loaded once per process and kept: Flower rebuilds a ClientApp for every message,
but the Ray actor (or SuperNode) process that runs it lives across rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedmed.config import FedmedConfig
from fedmed.data import demo
from fedmed.data.phantom import CLASSES
from fedmed.errors import FedmedError

NUM_CLASSES = len(CLASSES)


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class SiteData:
    name: str
    index: int
    train: Split
    test: Split


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


def _split(images: demo.ImageSet) -> Split:
    return Split(to_tensor(images.images), torch.from_numpy(images.labels.astype("int64")))


def _spec(cfg: FedmedConfig) -> demo.DemoSpec:
    return demo.DemoSpec.from_config(cfg.data, cfg.seed)


@lru_cache(maxsize=None)  # one entry per hospital this process serves
def _demo_site(spec: demo.DemoSpec, cache_dir: str, index: int) -> SiteData:
    data = demo.load(spec, cache_dir)
    return SiteData(
        name=demo.hospital_name(index),
        index=index,
        train=_split(data.select("train", index)),
        test=_split(data.select("test", index)),
    )


def site_data(cfg: FedmedConfig, index: int) -> SiteData:
    """Hospital `index` of the configured dataset."""
    if not 0 <= index < cfg.data.hospitals:
        raise FedmedError(
            f"hospital index {index} is outside 0..{cfg.data.hospitals - 1} (data.hospitals)"
        )
    return _demo_site(_spec(cfg), cfg.data.cache_dir, index)


@lru_cache(maxsize=2)
def _demo_global_test(spec: demo.DemoSpec, cache_dir: str) -> Split:
    return _split(demo.load(spec, cache_dir).select("global_test"))


def global_test(cfg: FedmedConfig) -> Split:
    """The held-out test set the server evaluates the global model on."""
    return _demo_global_test(_spec(cfg), cfg.data.cache_dir)


def ensure_data(cfg: FedmedConfig, announce: Callable[[str], None] | None = None) -> None:
    """Generate and cache the dataset now, so no round ever waits for it."""
    demo.ensure_cached(_spec(cfg), cfg.data.cache_dir, announce)
