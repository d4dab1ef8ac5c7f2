"""One synthetic axial brain MRI slice: template anatomy, a lesion, a scanner.

The lesions follow the radiology of the four Kaggle classes:
glioma (intra-axial, in white matter, irregular, heterogeneous core, oedema),
meningioma (extra-axial at the convexity or falx, round, homogeneous, displacing
cortex), pituitary (midline sellar mass on inferior slices) and no tumour.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from fedmed.data.scanners import ScannerProfile
from fedmed.data.template import SELLA_LEVELS, SELLA_XY, Z_LEVELS, AxialStack

CLASSES: tuple[str, ...] = ("glioma", "meningioma", "no_tumour", "pituitary")

# Share of tumour slices that only graze the lesion (its edge, partial volume): small
# and faint, sometimes invisible. They keep the task from being trivially solvable.
FAINT_SHARE = 0.05


def _ndimage() -> ModuleType:
    """scipy.ndimage, imported when images are generated: a hospital's ClientApp, which
    only reads its prepared cache, starts without it (0.2 s per request)."""
    from scipy import ndimage

    return ndimage


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Zero-mean, unit-scale random field that varies over `grid` cells."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    return _ndimage().zoom(coarse, size / grid, order=3, grid_mode=True, mode="reflect")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    return rows, cols


def _pick(rng: np.random.Generator, weights: np.ndarray) -> tuple[float, float]:
    """A random pixel, drawn with probability proportional to `weights`."""
    flat = weights.ravel().astype(np.float64)
    idx = rng.choice(flat.size, p=flat / flat.sum())
    row, col = divmod(int(idx), weights.shape[1])
    return float(row), float(col)


def _glioma(img, wm, rng, rows, cols, scale) -> np.ndarray:
    size = img.shape[0]
    wm_core = _ndimage().binary_erosion(wm > 0.6, iterations=max(1, size // 40))
    weights = wm_core if wm_core.any() else wm > 0.3
    r0, c0 = _pick(rng, weights.astype(np.float32))
    radius = rng.uniform(0.06, 0.12) * size * scale
    dist = np.hypot(rows - r0, cols - c0) / radius
    dist = dist + 0.25 * _smooth_noise(rng, size, 5) + 0.2 * _smooth_noise(rng, size, 11)
    brain = img > 0.05
    oedema = np.clip((1.9 - dist) / 0.6, 0.0, 1.0) * brain
    img = img * (1.0 - rng.uniform(0.25, 0.4) * oedema)  # T1-hypointense oedema
    core = np.clip((1.0 - dist) / 0.15, 0.0, 1.0) * brain
    texture = 0.12 * _smooth_noise(rng, size, 12)
    rim = rng.uniform(0.95, 1.15)  # enhancing rim, brighter than white matter (T1c)
    necrosis = rng.uniform(0.15, 0.45) if rng.random() < 0.6 else rim
    inner = np.clip((0.65 - dist) / 0.2, 0.0, 1.0)
    core_value = rim * (1.0 - inner) + necrosis * inner + texture
    return img * (1.0 - core) + core_value * core


def _meningioma(img, rng, rows, cols, stack_brain, scale) -> np.ndarray:
    size = img.shape[0]
    centre = size / 2.0
    radius = rng.uniform(0.065, 0.12) * size * scale
    edge = stack_brain & ~_ndimage().binary_erosion(stack_brain, iterations=2)
    if rng.random() < 0.25:  # falx: along the midline
        band = edge | stack_brain
        band = band & (np.abs(cols - centre) < 0.02 * size)
        band = band & (np.abs(rows - centre) < 0.35 * size)
    else:  # convexity
        band = edge
    r0, c0 = _pick(rng, band.astype(np.float32))
    # Push the tissue around the mass outwards (extra-axial mass effect).
    dr, dc = rows - r0, cols - c0
    dist = np.hypot(dr, dc) + 1e-3
    push = radius * 0.6 * np.exp(-((dist / (1.8 * radius)) ** 2))
    src_r = rows - push * dr / dist
    src_c = cols - push * dc / dist
    img = _ndimage().map_coordinates(img, [src_r, src_c], order=1, mode="constant")
    shape = np.hypot(dr, dc) / radius + 0.08 * _smooth_noise(rng, size, 4)
    mass = np.clip((1.0 - shape) / 0.08, 0.0, 1.0)  # sharp, well circumscribed
    value = rng.uniform(1.0, 1.2) + 0.03 * _smooth_noise(rng, size, 10)  # avid enhancement
    return img * (1.0 - mass) + value * mass


def _pituitary(img, rng, rows, cols, stack: AxialStack, scale) -> np.ndarray:
    size = img.shape[0]
    r0, c0 = stack.to_grid(*SELLA_XY)
    r0 += rng.normal(0.0, 0.01) * size
    c0 += rng.normal(0.0, 0.006) * size
    radius = rng.uniform(0.035, 0.07) * size * scale
    shape = np.hypot(rows - r0, (cols - c0) * rng.uniform(0.85, 1.15)) / radius
    shape = shape + 0.12 * _smooth_noise(rng, size, 5)
    mass = np.clip((1.0 - shape) / 0.12, 0.0, 1.0)
    value = rng.uniform(0.95, 1.15) + 0.05 * _smooth_noise(rng, size, 10)
    return img * (1.0 - mass) + value * mass


def _warp(img: np.ndarray, rng: np.random.Generator, rows, cols) -> np.ndarray:
    """Small affine (pose, head size) and elastic (anatomy) deformation."""
    size = img.shape[0]
    c = (size - 1) / 2.0
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-0.04, 0.04, size=2) * size
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    r, q = rows - c - shift[0], cols - c - shift[1]
    src_r = cos * r - sin * q + c
    src_c = sin * r + cos * q + c
    amp = 0.012 * size
    src_r = src_r + amp * _smooth_noise(rng, size, 5)
    src_c = src_c + amp * _smooth_noise(rng, size, 5)
    return _ndimage().map_coordinates(img, [src_r, src_c], order=1, mode="constant")


def acquire(img: np.ndarray, out_size: int, profile: ScannerProfile, rng) -> np.ndarray:
    """Acquire the anatomy with one hospital's scanner; returns uint8."""
    size = img.shape[0]
    jitter = lambda v, s=0.1: v * rng.uniform(1.0 - s, 1.0 + s)  # noqa: E731
    bias = np.exp(jitter(profile.bias) * np.clip(_smooth_noise(rng, size, 3), -2, 2))
    img = img * bias
    img = img / max(float(np.percentile(img, 99.5)), 1e-3)  # scanner auto-scaling
    img = np.clip(img, 0.0, 1.0) ** jitter(profile.gamma, 0.05)
    factor = size // out_size
    if factor > 1:
        img = img.reshape(out_size, factor, out_size, factor).mean(axis=(1, 3))
    elif img.shape[0] != out_size:
        img = _ndimage().zoom(img, out_size / img.shape[0], order=1)
    blur = jitter(profile.blur, 0.2)
    if blur > 0.05:
        img = _ndimage().gaussian_filter(img, blur)
    sigma = jitter(profile.noise, 0.2)
    real = img + rng.normal(0.0, sigma, img.shape)
    imag = rng.normal(0.0, sigma, img.shape)
    img = np.hypot(real, imag) * jitter(profile.gain, 0.05)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render(
    stack: AxialStack,
    label: int,
    profile: ScannerProfile,
    out_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One (out_size, out_size) uint8 slice of class `CLASSES[label]`."""
    name = CLASSES[label]
    lo, hi = SELLA_LEVELS if name == "pituitary" else (SELLA_LEVELS[0], Z_LEVELS[1])
    i = stack.index(int(rng.integers(lo, hi + 1)))
    healthy = stack.t1[i]
    rows, cols = _grid(stack.size)
    scale = 0.6 if rng.random() < FAINT_SHARE else 1.0
    if name == "glioma":
        img = _glioma(healthy, stack.wm[i], rng, rows, cols, scale)
    elif name == "meningioma":
        img = _meningioma(healthy, rng, rows, cols, healthy > 0.05, scale)
    elif name == "pituitary":
        img = _pituitary(healthy, rng, rows, cols, stack, scale)
    else:
        img = healthy.copy()
    if scale < 1.0 and name != "no_tumour":  # partial volume: the lesion barely shows
        img = healthy + rng.uniform(0.25, 0.6) * (img - healthy)
    img = img * rng.uniform(0.9, 1.1)  # per-subject intensity
    img = _warp(img, rng, rows, cols)
    return acquire(img, out_size, profile, rng)
