"""Decode one unit of a dataset (an image file, a NIfTI volume, a DICOM series) into
square uint8 slices at the training size.

Runs in worker processes on first load, so it imports no torch. Problems with a
file raise `Skip` with a reason that names no path: the caller knows the file.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# 16-bit PNGs and TIFFs: rescaled by their own range rather than truncated.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class Skip(Exception):
    """This file (or series) cannot be used; the message says why."""


@dataclass(frozen=True)
class DecodeSettings:
    slab: float
    min_foreground: float
    normalise: str
    max_pixels: int  # data.max_pixels: the most pixels (voxels) one file may declare


@dataclass
class Decoded:
    images: np.ndarray  # (k, S, S) uint8
    width: int = 0  # source size, for the data report
    height: int = 0
    mode: str = ""
    low: float = 0.0  # source intensity range
    high: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative file, reason)


def to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square (keeping the aspect ratio) and resize; uint8 in, uint8 out."""
    h, w = image.shape
    side = max(h, w)
    if h != w:
        padded = np.zeros((side, side), dtype=np.uint8)
        padded[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = image
        image = padded
    if side == size:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def image_hash(image: np.ndarray) -> int:
    """64-bit digest of an image's pixels: equal images, equal hashes."""
    return int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little", signed=True)


def oversize(noun: str, shape: tuple[int, ...], max_pixels: int, unit: str = "pixels") -> str | None:
    """The skip reason for a file whose header declares more than data.max_pixels, or None."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if count <= max_pixels:
        return None
    dims = "x".join(str(int(n)) for n in shape)
    return f"{noun} declares {dims} {unit} ({count:,}), over data.max_pixels = {max_pixels:,}"


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---- image files ----------------------------------------------------------------


@contextmanager
def _header_bound_only() -> Iterator[None]:
    """Pillow's own decompression-bomb guard off, so data.max_pixels is the one bound:
    Pillow would warn above its default 89 megapixels and refuse above twice that,
    whatever data.max_pixels says. decode_image checks the declared size itself, right
    after Image.open has read the header."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_image(path: Path, size: int, max_pixels: int) -> Decoded:
    try:
        with _header_bound_only(), Image.open(path) as img:  # reads the header only
            width, height, mode = img.width, img.height, img.mode
            too_large = oversize("image", (width, height), max_pixels)
            if too_large:
                raise Skip(too_large)
            if min(width, height) < 8 or max(width, height) > 16 * min(width, height):
                raise Skip(f"image is {width}x{height} pixels: not a slice")
            if img.format == "JPEG":
                img.draft("L", (size, size))  # decode at a reduced scale: much faster
            img.load()
            if img.mode in _WIDE_MODES:
                values = np.asarray(img, dtype=np.float32)
                if not np.isfinite(values).all():
                    raise Skip("image is not finite (NaN or infinite pixels)")
                low, high = float(values.min()), float(values.max())
                gray = _rescale(values, low, high)
            else:
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA").convert("RGB")
                gray = np.asarray(img.convert("L"), dtype=np.uint8)
                low, high = float(gray.min()), float(gray.max())
        if high <= low:
            raise Skip("blank image (constant intensity)")
        square = to_square(gray, size)
    except FileNotFoundError:
        raise Skip("unreadable file (missing or a broken link)") from None
    except PermissionError:
        raise Skip("unreadable file (permission denied)") from None
    except MemoryError:
        raise Skip("image too large to decode safely") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        if "truncated" in text:
            raise Skip("truncated image") from None
        if "cannot identify image file" in text:
            raise Skip("not a readable image") from None
        raise Skip("corrupt image") from None
    return Decoded(square[None], width, height, mode, low, high)


# ---- volumes (NIfTI, DICOM series) ------------------------------------------------


def volume_slices(volume: np.ndarray, size: int, settings: DecodeSettings) -> np.ndarray:
    """(Z, H, W) intensities -> the slab's non-empty slices, normalised per volume, (k, S, S) uint8.

    NaN voxels are background (SPM and FSL write NaN outside the brain mask); an infinite
    voxel would stretch the intensity scale until every other voxel is 0."""
    volume = volume.astype(np.float32, copy=False)
    if np.isinf(volume).any():
        raise Skip("volume has infinite voxels")
    volume = np.nan_to_num(volume)
    lo, hi = float(volume.min()), float(volume.max())
    if hi <= lo:
        raise Skip("volume is blank (constant intensity)")
    # Background is what fills the borders of the slices (zero in most scans, but not
    # in signed or already-normalised volumes).
    border = np.concatenate([volume[:, [0, -1], :].ravel(), volume[:, :, [0, -1]].ravel()])
    foreground = np.abs(volume - float(np.median(border))) > 0.02 * (hi - lo)
    values = volume[foreground]
    if values.size == 0:
        raise Skip("volume holds nothing but background")
    if settings.normalise == "percentile":
        p_lo, p_hi = np.percentile(values, [0.5, 99.5])
        if p_hi <= p_lo:  # a few distinct values (a mask, a phantom): use the whole range
            p_lo, p_hi = float(values.min()), float(values.max())
        scaled = _rescale(volume, float(p_lo), float(p_hi))
    else:
        mean, std = float(values.mean()), float(values.std()) or 1.0
        scaled = _rescale((volume - mean) / std, -3.0, 3.0)
    scaled[~foreground] = 0
    share = foreground.reshape(len(volume), -1).mean(axis=1)
    occupied = np.flatnonzero(share > 0)
    first, extent = occupied[0], occupied[-1] + 1 - occupied[0]
    kept = max(1, int(extent * settings.slab + 0.5))
    start = first + (extent - kept) // 2
    keep = [z for z in range(start, start + kept) if share[z] >= settings.min_foreground]
    if not keep:
        raise Skip("no slice in the slab has enough foreground (see data.slab, data.min_foreground)")
    return np.stack([to_square(scaled[z], size) for z in keep])


def decode_nifti(path: Path, size: int, settings: DecodeSettings) -> Decoded:
    import nibabel as nib

    try:
        image = nib.load(str(path))  # the header; the voxels are read below
        shape = tuple(image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise Skip(f"NIfTI volume is {len(shape)}-D, expected 3-D")
        too_large = oversize("NIfTI volume", shape, settings.max_pixels, unit="voxels")
        if too_large:
            raise Skip(too_large)
        image = nib.as_closest_canonical(image)  # RAS: axial slices along the last axis
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
    except Skip:
        raise
    except FileNotFoundError:
        raise Skip("unreadable file (missing or a broken link)") from None
    except PermissionError:
        raise Skip("unreadable file (permission denied)") from None
    except Exception:  # noqa: BLE001 - nibabel raises many types for a damaged file (EOFError, zlib, ImageFileError)
        raise Skip("corrupt or truncated NIfTI volume") from None
    # (x, y, z) -> (z, rows, cols) with anterior at the top, as a viewer shows axial slices.
    stack = np.rot90(data, k=1, axes=(0, 1)).transpose(2, 0, 1)
    out = Decoded(volume_slices(stack, size, settings), data.shape[0], data.shape[1], "nifti")
    out.low, out.high = float(np.nanmin(data)), float(np.nanmax(data))  # NaN: background
    return out


def read_dicom(path: Path, header_only: bool = False):
    """pydicom's reader without its warnings, which name the file: a damaged file is
    reported by the caller, as a count and a reason."""
    import logging

    import pydicom

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=header_only)


def _normal_position(ds) -> float | None:
    """Position along the slice normal (ImagePositionPatient . row x col), if the file says."""
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        return float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal))
    except Exception:  # noqa: BLE001 - absent or malformed tags
        return None


def _instance_number(ds) -> float:
    try:
        return float(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def _undecodable(ds) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
    if syntax is None:
        return "DICOM pixel data cannot be read"
    try:
        name = syntax.name
    except Exception:  # noqa: BLE001
        name = "unknown"
    return (
        f"transfer syntax '{name}' ({syntax}) cannot be decoded here: decompress the series "
        "(e.g. gdcmconv --raw) or install a pydicom decoder plugin (pylibjpeg)"
    )


def read_dicom_series(root: Path, files: tuple[str, ...]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(Z, H, W) values in physical units (RescaleSlope/Intercept applied), ordered along
    the slice normal (or by InstanceNumber if any slice lacks its position), and the
    files that had to be skipped."""
    slices, skipped = [], []
    for rel in files:
        try:
            ds = read_dicom(root / rel)
        except Exception:  # noqa: BLE001 - a damaged file raises almost anything (struct.error, NotImplementedError, ...)
            skipped.append((rel, "corrupt or truncated DICOM file"))
            continue
        if "PixelData" not in ds:
            skipped.append((rel, "DICOM file has no pixel data"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = ds.pixel_array.astype(np.float32)
        except Exception:  # noqa: BLE001 - no decoder for the transfer syntax, or damaged pixel data
            skipped.append((rel, _undecodable(ds)))
            continue
        if pixels.ndim != 2:
            skipped.append((rel, "DICOM file is not a single 2-D grayscale slice (multi-frame or colour)"))
            continue
        try:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
        except (TypeError, ValueError):
            skipped.append((rel, "DICOM RescaleSlope/RescaleIntercept is not one number"))
            continue
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":  # white is low
            pixels = pixels.max() - pixels
        slices.append((_normal_position(ds), _instance_number(ds), pixels * slope + intercept))
    if not slices:
        raise Skip(skipped[0][1] if skipped else "DICOM series has no readable slice")
    if len({s.shape for _, _, s in slices}) > 1:
        raise Skip("DICOM series mixes slice sizes")
    by_position = all(position is not None for position, _, _ in slices)
    slices.sort(key=lambda item: item[0] if by_position else item[1])
    return np.stack([s for _, _, s in slices]), skipped


def decode_dicom_series(root: Path, files: tuple[str, ...], size: int, settings: DecodeSettings) -> Decoded:
    volume, skipped = read_dicom_series(root, files)
    out = Decoded(volume_slices(volume, size, settings), volume.shape[2], volume.shape[1], "dicom", skipped=skipped)
    out.low, out.high = float(volume.min()), float(volume.max())
    return out
