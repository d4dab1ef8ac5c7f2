"""The MNI ICBM152 2009 brain template that ships inside the nilearn wheel.

The demo data is built from this real anatomy, read from the installed package:
nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np

from fedmed.errors import FedmedError

_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

# Axial levels (voxel index along z, 1 mm) with enough white matter for every class;
# the sellar region (pituitary) lies at the inferior end of this range.
Z_LEVELS = (50, 136)
SELLA_LEVELS = (48, 62)
# Square crop (voxel indices) around the brain's bounding box in x and y.
_CROP_X = (3, 193)
_CROP_Y = (22, 212)
# Sella turcica centre in voxel coordinates (x, y) of the template.
SELLA_XY = (98.0, 136.0)


def _ndimage() -> ModuleType:
    """scipy.ndimage, imported when images are generated: a hospital's ClientApp, which
    only reads its prepared cache, starts without it (0.2 s per request)."""
    from scipy import ndimage

    return ndimage


def template_dir() -> Path:
    """Folder of nilearn's bundled data, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FedmedError(
            "the MNI brain template ships with the nilearn package, which is not "
            "installed: run `make install` (or `pip install nilearn`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not (folder / _FILE.format("t1")).is_file():
        raise FedmedError(
            f"nilearn is installed but its MNI template is missing from {folder}: "
            "reinstall nilearn"
        )
    return folder


@lru_cache(maxsize=1)
def _volumes() -> dict[str, np.ndarray]:
    import nibabel as nib

    folder = template_dir()
    return {
        key: np.asarray(nib.load(folder / _FILE.format(key)).dataobj, dtype=np.uint8)
        for key in ("t1", "gm", "wm")
    }


@dataclass(frozen=True)
class AxialStack:
    """Template slices resampled to a square working grid, anterior at the top.

    Arrays are float32 in [0, 1] with shape (levels, size, size); `levels[i]` is the
    template z index of slice i.
    """

    levels: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    size: int

    def index(self, z: int) -> int:
        return int(z - self.levels[0])

    def to_grid(self, x: float, y: float) -> tuple[float, float]:
        """Template voxel (x, y) to working-grid (row, col)."""
        scale = self.size / (_CROP_X[1] - _CROP_X[0])
        col = (x - _CROP_X[0]) * scale
        row = (_CROP_Y[1] - 1 - y) * scale
        return row, col


@lru_cache(maxsize=4)
def axial_stack(size: int) -> AxialStack:
    """Resample every usable axial slice of the template to `size` x `size`."""
    vols = _volumes()
    lo = min(Z_LEVELS[0], SELLA_LEVELS[0])
    hi = max(Z_LEVELS[1], SELLA_LEVELS[1])
    levels = np.arange(lo, hi + 1)
    zoom = size / (_CROP_X[1] - _CROP_X[0])
    out: dict[str, np.ndarray] = {}
    for key, vol in vols.items():
        crop = vol[_CROP_X[0] : _CROP_X[1], _CROP_Y[0] : _CROP_Y[1], lo : hi + 1]
        # (x, y, z) -> (z, row=anterior-first y, col=x)
        crop = np.transpose(crop, (2, 1, 0))[:, ::-1, :].astype(np.float32) / 255.0
        out[key] = _ndimage().zoom(crop, (1.0, zoom, zoom), order=1).clip(0.0, 1.0)
    return AxialStack(levels=levels, size=size, **out)
