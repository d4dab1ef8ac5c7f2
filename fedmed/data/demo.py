"""The embedded default data: simulated hospitals, generated once and cached.

Every image has its own seed (dataset seed, hospital, split, index), so the data
is identical whatever the order or number of worker processes that make it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import DataConfig, SkewConfig
from fedmed.data.phantom import CLASSES, render
from fedmed.data.scanners import ScannerProfile, hospital_profiles
from fedmed.data.template import axial_stack
from fedmed.errors import FedmedError, os_error_line

GENERATOR_VERSION = 2
SPLITS = ("train", "test", "global_test")


@dataclass(frozen=True)
class DemoSpec:
    """Everything that decides the demo images (and so the cache key)."""

    seed: int
    image_size: int
    hospitals: int
    train_per_hospital: int
    test_per_hospital: int
    global_test_size: int
    # Skewed hospitals: images per hospital and class (None: balanced, train_per_hospital each).
    train_counts: tuple[tuple[int, ...], ...] | None = None
    test_counts: tuple[tuple[int, ...], ...] | None = None
    shared_scanner: bool = False

    @classmethod
    def from_config(cls, data: DataConfig, seed: int, skew: SkewConfig | None = None) -> DemoSpec:
        spec = cls(
            seed=seed,
            image_size=data.image_size,
            hospitals=data.hospitals,
            train_per_hospital=data.train_per_hospital,
            test_per_hospital=data.test_per_hospital,
            global_test_size=data.global_test_size,
            shared_scanner=skew is not None and skew.scanners == "shared",
        )
        if skew is None or (skew.labels, skew.quantity) == ("iid", "equal"):
            return spec
        from fedmed.data.skew import counts, share_matrix

        def balanced(total: int) -> np.ndarray:
            return np.bincount(np.arange(total) % len(CLASSES), minlength=len(CLASSES))

        supply = balanced(data.hospitals * data.train_per_hospital)
        shares = share_matrix(skew, data.hospitals, supply, seed)
        train = counts(shares, supply)
        test = counts(shares, balanced(data.hospitals * data.test_per_hospital))
        short = np.flatnonzero(test.sum(axis=1) == 0)
        if len(short):
            raise FedmedError(
                f"hospital {short[0] + 1} would get no test images with these skew settings: raise data.test_per_hospital"
            )
        as_tuple = lambda m: tuple(tuple(int(v) for v in row) for row in m)  # noqa: E731
        return dataclasses.replace(spec, train_counts=as_tuple(train), test_counts=as_tuple(test))

    def digest(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if v is not None and v is not False}  # unskewed: the old keys
        payload = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def profiles(self) -> list[ScannerProfile]:
        profiles = hospital_profiles(self.hospitals, self.seed)
        return [profiles[0]] * self.hospitals if self.shared_scanner else profiles


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W) uint8 with integer labels into `CLASSES`."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DemoData:
    images: np.ndarray  # (N, S, S) uint8
    labels: np.ndarray  # (N,) int64
    hospital: np.ndarray  # (N,) int64; the global test set spans all hospitals' scanners
    split: np.ndarray  # (N,) int64 index into SPLITS
    profiles: tuple[ScannerProfile, ...]

    def select(self, split: str, hospital: int | None = None) -> ImageSet:
        keep = self.split == SPLITS.index(split)
        if hospital is not None:
            keep &= self.hospital == hospital
        idx = np.flatnonzero(keep)
        return ImageSet(np.asarray(self.images[idx]), np.asarray(self.labels[idx]))


def hospital_name(index: int) -> str:
    return f"hospital-{index + 1:02d}"


def cache_root(cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDMED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmed"


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % len(CLASSES)
    return rng.permutation(labels)


def _hospital_plan(spec: DemoSpec, h: int) -> list[tuple[int, int, int, int]]:
    """(hospital, split, index, label) for hospital `h`'s training and test images."""
    plan = []
    for split, n, skewed in ((0, spec.train_per_hospital, spec.train_counts), (1, spec.test_per_hospital, spec.test_counts)):
        rng = np.random.default_rng([spec.seed, h, split])
        labels = _balanced_labels(n, rng) if skewed is None else rng.permutation(np.repeat(np.arange(len(CLASSES)), skewed[h]))
        plan += [(h, split, i, int(y)) for i, y in enumerate(labels)]
    return plan


def _global_test_plan(spec: DemoSpec) -> list[tuple[int, int, int, int]]:
    """The global test set's images, each acquired with one hospital's scanner in turn."""
    labels = _balanced_labels(spec.global_test_size, np.random.default_rng([spec.seed, 2]))
    return [(i % spec.hospitals, 2, i, int(y)) for i, y in enumerate(labels)]


def _plan(spec: DemoSpec) -> list[tuple[int, int, int, int]]:
    """(hospital, split, index, label) for every image, in storage order."""
    return [entry for h in range(spec.hospitals) for entry in _hospital_plan(spec, h)] + _global_test_plan(spec)


def _render_chunk(spec: DemoSpec, chunk: list[tuple[int, int, int, int]]) -> np.ndarray:
    stack = axial_stack(min(2 * spec.image_size, 256))
    profiles = _profiles(spec)
    out = np.empty((len(chunk), spec.image_size, spec.image_size), dtype=np.uint8)
    for k, (h, split, i, label) in enumerate(chunk):
        rng = np.random.default_rng([spec.seed, h, split, i, 1])
        out[k] = render(stack, label, profiles[h], spec.image_size, rng)
    return out


@lru_cache(maxsize=4)
def _profiles(spec: DemoSpec) -> list[ScannerProfile]:
    return spec.profiles()


def generate(spec: DemoSpec, workers: int | None = None) -> DemoData:
    """Render every image of the spec (no cache); `workers` processes (default: the
    machine's cores, or 1 for small sets, where starting processes costs more). Runs
    load each hospital's images when it is first asked instead (`hospital`)."""
    plan = _plan(spec)
    images = _render(spec, plan, workers)
    table = np.array([(h, s, y) for h, s, _, y in plan], dtype=np.int64).reshape(-1, 3)
    return DemoData(
        images=images,
        labels=table[:, 2],
        hospital=table[:, 0],
        split=table[:, 1],
        profiles=tuple(spec.profiles()),
    )


def _render(spec: DemoSpec, plan: list[tuple[int, int, int, int]], workers: int | None = None) -> np.ndarray:
    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if len(plan) > 200 else 1
    chunks = [plan[i::workers] for i in range(workers)]
    if len(chunks) == 1:
        rendered = [_render_chunk(spec, plan)]
    else:
        with ProcessPoolExecutor(len(chunks)) as pool:
            rendered = list(pool.map(_render_chunk, [spec] * len(chunks), chunks))
    images = np.empty((len(plan), spec.image_size, spec.image_size), dtype=np.uint8)
    for w, part in enumerate(rendered):
        images[w :: len(rendered)] = part
    return images


def cache_path(spec: DemoSpec, cache_dir: str = "") -> Path:
    return cache_root(cache_dir) / f"demo-{spec.digest()}"


GLOBAL_TEST = "global_test.npz"


def ensure_cached(spec: DemoSpec, cache_dir: str = "", announce: Callable[[str], None] | None = None) -> Path:
    """The global test set in the cache (generated unless it is there already); each
    hospital's images are made when it is first asked (`hospital`)."""
    target = cache_path(spec, cache_dir)
    if (target / GLOBAL_TEST).is_file():
        return target
    if announce:
        announce(f"generating the demo's global test set once: {spec.global_test_size} images of {spec.image_size}x{spec.image_size} -> {target}")
    plan = _global_test_plan(spec)
    images = _render(spec, plan)
    meta = {"generator_version": GENERATOR_VERSION, "spec": spec.__dict__, "classes": list(CLASSES)}
    try:
        target.mkdir(parents=True, exist_ok=True)
        _write_atomic(target / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _save_set(target / GLOBAL_TEST, ImageSet(images, np.array([y for *_, y in plan], dtype=np.int64)))
    except OSError as exc:
        if not (target / GLOBAL_TEST).is_file():
            raise FedmedError(f"cannot write the data cache in {target.parent}: {os_error_line(exc)}") from None
    return target


def _write_atomic(path: Path, write: Callable[[Any], Any]) -> None:
    """Write `path` whole or not at all (another process may be writing the same file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_set(path: Path, images: ImageSet) -> None:
    _write_atomic(path, lambda f: np.savez(f, images=images.images, labels=images.labels))


def _load_set(path: Path) -> ImageSet:
    with np.load(path) as saved:
        return ImageSet(saved["images"], saved["labels"])


def global_test(spec: DemoSpec, cache_dir: str = "") -> ImageSet:
    """The global test set, from the cache (generated on first use)."""
    return _load_set(ensure_cached(spec, cache_dir) / GLOBAL_TEST)


def hospital(spec: DemoSpec, cache_dir: str, h: int) -> tuple[ImageSet, ImageSet]:
    """Hospital `h`'s training and test images: from the cache, or made now and cached
    (a cache that cannot be written is only a cache: the images are the same)."""
    path = cache_path(spec, cache_dir) / "hospitals" / f"{h:05d}.npz"
    if path.is_file():
        try:
            with np.load(path) as saved:
                return ImageSet(saved["train_images"], saved["train_labels"]), ImageSet(saved["test_images"], saved["test_labels"])
        except (OSError, ValueError, KeyError, EOFError):  # damaged: made again below
            pass
    plan = _hospital_plan(spec, h)
    images = _render_chunk(spec, plan)
    labels = np.array([y for *_, y in plan], dtype=np.int64)
    train = np.array([split == 0 for _, split, _, _ in plan], dtype=bool)
    sets = ImageSet(images[train], labels[train]), ImageSet(images[~train], labels[~train])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda f: np.savez(
            f, train_images=sets[0].images, train_labels=sets[0].labels, test_images=sets[1].images, test_labels=sets[1].labels
        ))
    except OSError:
        pass
    return sets
