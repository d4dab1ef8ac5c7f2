"""A dataset on disk, decoded once into a uint8 memory-mapped cache.

The cache key is a digest of the file list (names, sizes, modification times) and
every setting that changes the decoded pixels, so an edited dataset or a new image
size decodes afresh and anything else starts in seconds. The cache lives on the
machine that holds the data (`data.cache_dir`, by default ~/.cache/fedmed/datasets).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile

from fedmed.config import DataConfig
from fedmed.data.decode import Decoded, DecodeSettings, Skip, decode_dicom_series, decode_image, decode_nifti, image_hash, oversize, to_square
from fedmed.data.demo import cache_root
from fedmed.data.layout import SPLITS, SYSTEM_REASON, Unit, detect_format, list_files, scan
from fedmed.errors import FedmedError, os_error_line

DECODER_VERSION = 3  # bump when decoding changes what a cached dataset holds
CACHE_FILES = ("images.npy", "index.npz", "manifest.json")


@dataclass(frozen=True)
class Dataset:
    """Every usable slice, with what the layout says about it."""

    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64, into classes
    split: np.ndarray  # (N,) int8: -1 not given by the layout, 0 train, 1 test
    site: np.ndarray  # (N,) int16: index into manifest["sites"], -1 without hospital folders
    patient: np.ndarray  # (N,) int64 digest of the patient key
    hashes: np.ndarray  # (N,) int64 digest of the pixels (duplicate detection)
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(item) for item in self.manifest["skipped"]]

    def skip_counts(self, include_system: bool = True) -> Counter[str]:
        return Counter(r for _, r in self.skipped if include_system or r != SYSTEM_REASON)


def _digest(*parts: Any) -> int:
    text = json.dumps(parts, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def resolve_root(data: DataConfig) -> Path:
    root = Path(data.path).expanduser()
    if not root.exists():
        raise FedmedError(f"data.path does not exist: {root} (give the dataset's folder or .npz file)")
    if root.is_file() and not root.name.lower().endswith(".npz"):
        raise FedmedError(f"data.path is a file but not an .npz archive: {root} (give the dataset's folder)")
    return root.resolve()


def _decode_settings(data: DataConfig) -> dict[str, Any]:
    written = data.model_dump()  # the lists as the config writes them: the cache key predates typed lists
    return {
        "version": DECODER_VERSION,
        "image_size": data.image_size,
        "classes": written["classes"],
        "class_map": written["class_map"],
        "slab": data.slab,
        "min_foreground": data.min_foreground,
        "normalise": data.normalise,
        "modality": data.modality,
        "max_pixels": data.max_pixels,
        "decoders": _decoders(),
    }


def _decoders() -> dict[str, str]:
    """Reader versions, and which optional DICOM decoders are installed: installing one
    can turn a skipped series into a readable one."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("pillow", "nibabel", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "python-gdcm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _fingerprint(root: Path, files: list[str], fmt: str, data: DataConfig) -> str:
    base = root.parent if root.is_file() else root
    stats = []
    for rel in files:
        try:
            st = os.stat(base / rel)
            stats.append((rel, st.st_size, st.st_mtime_ns, st.st_mode))  # mode: a chmod can make a file readable
        except OSError:
            stats.append((rel, -1, -1, -1))
    labels = b""
    if data.labels_csv:
        csv_path = Path(data.labels_csv) if Path(data.labels_csv).is_absolute() else base / data.labels_csv
        labels = csv_path.read_bytes() if csv_path.is_file() else b""
    payload = json.dumps([fmt, _decode_settings(data), stats, hashlib.sha256(labels).hexdigest()])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_dataset(data: DataConfig, announce: Callable[[str], None] | None = None) -> Dataset:
    """The dataset at `data.path`, decoded (first time) or read from the cache."""
    root = resolve_root(data)
    passed: list[tuple[str, str]] = []
    if root.is_file():
        files, fmt = [root.name], "npz"
        if data.format not in ("auto", "npz"):
            raise FedmedError(f"data.path is an .npz file but data.format = {data.format}: set data.format = npz")
    else:
        files, passed = list_files(root)
        fmt = data.format if data.format != "auto" else detect_format(root, files)
        if fmt == "npz":
            archives = [f for f in files if f.lower().endswith(".npz")]
            if len(archives) != 1:
                raise FedmedError(f"data.format = npz needs exactly one .npz file in data.path (found {len(archives)})")
            root, files = root / archives[0], [Path(archives[0]).name]
    cache = cache_root(data.cache_dir) / "datasets" / _fingerprint(root, files, fmt, data)
    if not _complete(cache):
        if announce:
            announce(f"decoding the {fmt} dataset (first use; later runs read the cache in {cache.parent})")
        _build(cache, root, files, passed, fmt, data)
    return _read(cache)


# ---- building the cache -------------------------------------------------------


def _decode_unit(task: tuple[str, Unit, str, int, DecodeSettings]) -> Decoded | str:
    root, unit, fmt, size, settings = task
    try:
        if fmt == "imagefolder":
            return decode_image(Path(root) / unit.files[0], size, settings.max_pixels)
        if fmt == "nifti":
            return decode_nifti(Path(root) / unit.files[0], size, settings)
        return decode_dicom_series(Path(root), unit.files, size, settings)
    except Skip as exc:
        return str(exc)


def _decode_all(root: Path, units: list[Unit], fmt: str, data: DataConfig) -> list[Decoded | str]:
    from rich.progress import Progress

    settings = DecodeSettings(data.slab, data.min_foreground, data.normalise, data.max_pixels)
    tasks = [(str(root), u, fmt, data.image_size, settings) for u in units]
    workers = min(data.workers or os.cpu_count() or 1, max(1, len(tasks) // 32))
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"decoding {len(tasks)} {fmt} items", total=len(tasks))
        if workers <= 1:
            results = []
            for task in tasks:
                results.append(_decode_unit(task))
                progress.advance(bar)
            return results
        # forkserver: workers start clean, whatever threads this process (torch, Ray) runs.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = []
            for result in pool.map(_decode_unit, tasks, chunksize=16):
                results.append(result)
                progress.advance(bar)
            return results


def _build(cache: Path, root: Path, files: list[str], passed: list[tuple[str, str]], fmt: str, data: DataConfig) -> None:
    if fmt == "npz":
        arrays, manifest = _from_npz(root, data)
    else:
        layout = scan(root, files, fmt, data, passed)
        if not layout.units:
            arrays, manifest = _empty(data), {"skipped": layout.skipped}
        else:
            arrays, manifest = _assemble(layout.units, _decode_all(root, layout.units, fmt, data), layout.skipped)
        used = {u.folder for u, n in zip(layout.units, manifest.pop("decoded", []), strict=True) if n}
        manifest.update(
            sites=layout.sites,
            class_folders=layout.class_folders,
            empty_class_folders=sorted(set(layout.class_dirs) - used),
        )
    manifest.update(format=fmt, classes=list(data.classes), files=len(files), settings=_decode_settings(data), digest=cache.name)
    manifest.setdefault("sites", [])
    images = arrays.pop("images")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(cache.parent)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache.parent))
    except OSError as exc:
        raise FedmedError(f"cannot write the dataset cache in {cache.parent} ({exc.strerror}): set data.cache_dir") from None
    try:
        np.save(tmp / "images.npy", images)
        np.savez(tmp / "index.npz", **arrays)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if not _complete(cache):  # another process may have built it meanwhile: theirs is as good, and may be being read
            shutil.rmtree(cache, ignore_errors=True)  # an incomplete cache from an interrupted run (or none)
            try:
                os.replace(tmp, cache)
            except OSError:  # another process built it first
                pass
    except OSError as exc:
        raise FedmedError(f"cannot write the dataset cache in {cache.parent} ({os_error_line(exc)}): free space or set data.cache_dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(cache: Path) -> bool:
    return all((cache / name).is_file() for name in CACHE_FILES)


def _remove_leftovers(folder: Path, age_s: float = 3600.0) -> None:
    """Half-built caches of runs that were killed, once they are clearly abandoned."""
    for old in folder.glob(".building-*"):
        try:
            if time.time() - old.stat().st_mtime > age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _empty(data: DataConfig) -> dict[str, np.ndarray]:
    s = data.image_size
    return {
        "images": np.zeros((0, s, s), np.uint8),
        "labels": np.zeros(0, np.int64),
        "split": np.zeros(0, np.int8),
        "site": np.zeros(0, np.int16),
        "patient": np.zeros(0, np.int64),
        "hashes": np.zeros(0, np.int64),
    }


def _assemble(units: list[Unit], results: list[Decoded | str], skipped: list) -> tuple[dict, dict]:
    sites = sorted({u.site for u in units if u.site})
    images, labels, split, site, patient = [], [], [], [], []
    sizes, modes, lows, highs, decoded = [], Counter(), [], [], []
    for unit, result in zip(units, results, strict=True):
        decoded.append(not isinstance(result, str))
        if isinstance(result, str):
            skipped.extend((f, result) for f in unit.files)
            continue
        skipped.extend(result.skipped)
        k = len(result.images)
        images.append(result.images)
        labels += [unit.label] * k
        split += [unit.split] * k
        site += [sites.index(unit.site) if unit.site else -1] * k
        patient += [_digest(unit.site, unit.patient)] * k
        sizes.append((result.width, result.height))
        modes[result.mode] += 1
        lows.append(result.low)
        highs.append(result.high)
    stacked = np.concatenate(images) if images else np.zeros((0, 1, 1), np.uint8)
    arrays = {
        "images": stacked,
        "labels": np.asarray(labels, np.int64),
        "split": np.asarray(split, np.int8),
        "site": np.asarray(site, np.int16),
        "patient": np.asarray(patient, np.int64),
        "hashes": _hashes(stacked),
    }
    manifest = {"skipped": sorted(skipped), "decoded": decoded, **_describe_sources(sizes, modes, lows, highs)}
    return arrays, manifest


def _hashes(images: np.ndarray) -> np.ndarray:
    """Pixel digests for duplicate detection; 0 for constant (blank) images, which are
    alike without being copies and must not tie patients together."""
    return np.asarray([image_hash(img) if img.min() != img.max() else 0 for img in images], np.int64)


def _describe_sources(sizes: list[tuple[int, int]], modes: Counter, lows: list[float], highs: list[float]) -> dict:
    if not sizes:
        return {}
    areas = [w * h for w, h in sizes]
    return {
        "source_sizes": {
            "smallest": list(sizes[int(np.argmin(areas))]),
            "largest": list(sizes[int(np.argmax(areas))]),
            "distinct": len(set(sizes)),
        },
        "source_modes": dict(modes),
        "source_range": [min(lows), max(highs)],
    }


NPZ_SPLITS = {"train": "training", "val": "validation", "test": "test"}  # array prefix -> the split, as messages say it


def _npy_shape(archive: NpzFile, key: str) -> tuple[int, ...]:
    """An array's shape, read from its .npy header inside the zip: the array itself is
    not read. Member names as NumPy's NpzFile maps them."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    with archive.zip.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        # Version 3.0 differs from 2.0 only in allowing UTF-8 field names: numeric arrays are ASCII.
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(handle)
    return shape


def _refuse_oversize(key: str, shape: tuple[int, ...], max_pixels: int) -> None:
    """Before the array is read: a small compressed archive can declare gigabytes."""
    if len(shape) < 3:
        return  # not (N, H, W[, C]): the shape check names it
    reason = oversize(f"each image of {key}", (shape[2], shape[1]), max_pixels)
    if reason:
        raise FedmedError(f"{reason}: resize them in the .npz, or raise data.max_pixels")


def _refuse_unusable_images(name: str, images: np.ndarray) -> None:
    """An archive cannot skip part of an array as a folder skips a file, and one NaN would
    set the whole array's intensity scale: non-finite or blank images refuse the archive."""
    flat = images.reshape(len(images), -1)
    what = f"of {len(images)} {NPZ_SPLITS[name]} images ({name}_images) are"
    if np.issubdtype(images.dtype, np.inexact):
        bad = int((~np.isfinite(flat)).any(axis=1).sum())
        if bad:
            raise FedmedError(f"{bad} {what} not finite (NaN or infinite): repair or remove them, with their labels, in the .npz")
    blank = int((flat.min(axis=1) == flat.max(axis=1)).sum())
    if blank:
        raise FedmedError(f"{blank} {what} blank (one constant value): remove them, with their labels, from the .npz")


def _from_npz(path: Path, data: DataConfig) -> tuple[dict, dict]:
    """MedMNIST style: `{train,val,test}_images` with `{train,val,test}_labels` ((N,) or (N, 1)).
    Image sizes are checked against data.max_pixels from the arrays' headers, before any is read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [name for name in NPZ_SPLITS if f"{name}_images" in archive.files]
            for name in names:
                _refuse_oversize(f"{name}_images", _npy_shape(archive, f"{name}_images"), data.max_pixels)
            wanted = [f"{name}_{part}" for name in names for part in ("images", "labels")]
            present = {key: archive[key] for key in wanted if key in archive.files}
    except FedmedError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zip, CRC error, an .npy under an .npz name, object arrays...
        raise FedmedError(f"cannot read the .npz archive ({type(exc).__name__}): is it a complete NumPy .npz file?") from None
    n_classes = data.num_classes
    parts, sizes, modes, lows, highs = [], [], Counter(), [], []
    for name in names:
        images, labels = present[f"{name}_images"], present.get(f"{name}_labels")
        if images.ndim < 3 or not np.issubdtype(images.dtype, np.number) or labels is None or labels.ndim < 1 or len(labels) != len(images):
            raise FedmedError(f"the .npz needs {name}_images (N, H, W[, C]) and {name}_labels of the same length N")
        if not len(images):
            fix = "remove val_images and val_labels, or fill them" if name == "val" else f"put the {NPZ_SPLITS[name]} images in {name}_images and {name}_labels"
            raise FedmedError(f"the .npz's {NPZ_SPLITS[name]} split is empty ({name}_images holds no image): {fix}")
        labels = np.asarray(labels).reshape(len(labels), -1)
        if labels.shape[1] != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise FedmedError(f"{name}_labels must be one integer class per image (multi-label arrays are not supported)")
        labels = labels[:, 0].astype(np.int64)
        if labels.min() < 0 or labels.max() >= n_classes:
            raise FedmedError(
                f"{name}_labels run {labels.min()}..{labels.max()} but data.classes names {n_classes} classes: "
                "list one name per label in data.classes"
            )
        if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
            gray = images[..., 0] if images.shape[-1] == 1 else images[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
        else:
            gray = images
        if gray.ndim != 3:
            raise FedmedError(f"{name}_images must be (N, H, W) or (N, H, W, C) (got shape {images.shape})")
        _refuse_unusable_images(name, images)
        low, high = float(images.min()), float(images.max())
        if images.dtype == np.uint8:
            gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        else:  # other types: stretch the archive's own range to 0-255
            scale = 255.0 / (high - low) if high > low else 0.0
            gray = ((gray.astype(np.float32) - low) * scale + 0.5).astype(np.uint8)
        resized = np.stack([to_square(img, data.image_size) for img in gray])
        parts.append((resized, labels, SPLITS[name]))
        sizes.append(tuple(images.shape[2:0:-1]))
        modes["npz"] += len(images)
        lows.append(low)
        highs.append(high)
    if not parts:
        raise FedmedError("the .npz has no train_images, val_images or test_images array (MedMNIST layout)")
    stacked = np.concatenate([p[0] for p in parts])
    arrays = {
        "images": stacked,
        "labels": np.concatenate([p[1] for p in parts]),
        "split": np.concatenate([np.full(len(p[1]), p[2], np.int8) for p in parts]),
        "site": np.full(len(stacked), -1, np.int16),
        "patient": np.arange(len(stacked), dtype=np.int64),  # one image, one patient: the archive says no more
        "hashes": _hashes(stacked),
    }
    return arrays, {"skipped": [], **_describe_sources(sizes, modes, lows, highs)}


def _read(cache: Path) -> Dataset:
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    index = np.load(cache / "index.npz")
    return Dataset(
        images=np.load(cache / "images.npy", mmap_mode="r"),
        labels=index["labels"],
        split=index["split"],
        site=index["site"],
        patient=index["patient"],
        hashes=index["hashes"],
        manifest=manifest,
    )


def usable(ds: Dataset, data: DataConfig) -> list[str]:
    """Raise if the dataset cannot be trained on; otherwise the warnings to show."""
    counts = ds.skip_counts(include_system=False)
    reasons = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common(3))
    if len(ds) == 0:
        detail = f" ({sum(counts.values())} files skipped: {reasons})" if counts else ""
        raise FedmedError(f"no usable images in data.path{detail}; run `fedmed data check PATH` to see each file")
    if data.strict and counts:
        raise FedmedError(
            f"{sum(counts.values())} files could not be used ({reasons}) and data.strict is on: "
            "run `fedmed data check PATH` to list them, or set data.strict = false to skip them"
        )
    present = np.bincount(ds.labels, minlength=data.num_classes)
    if np.count_nonzero(present) < 2:
        raise FedmedError("the dataset holds images of fewer than two classes: nothing to learn to tell apart")
    warnings = []
    if counts:
        warnings.append(f"{sum(counts.values())} files skipped ({reasons})")
    empty = ds.manifest.get("empty_class_folders", [])
    if empty:
        shown = ", ".join(empty[:4]) + (f" and {len(empty) - 4} more" if len(empty) > 4 else "")
        warnings.append(f"{len(empty)} class folder(s) hold no usable image: {shown}")
    missing = [name for name, n in zip(data.classes, present, strict=True) if n == 0]
    if missing:
        warnings.append(f"no images of class {', '.join(missing)}")
    return warnings
