"""Small datasets in every format fedmed reads, written with the same libraries a
hospital's tools use (Pillow, nibabel, pydicom)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

KAGGLE = ("glioma", "meningioma", "notumor", "pituitary")


def picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A distinct uint8 image: a bright ellipse at a random place over noise."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    image = rng.integers(0, 40, (height, width)) + inside * rng.integers(120, 200)
    return image.clip(0, 255).astype(np.uint8)


def image_folder(root: Path, per_class: dict[str, int], seed: int = 0, split: str | None = None, suffix: str = ".png") -> list[Path]:
    """ROOT/[split/]<class>/img_NNN<suffix> with mixed sizes; every fifth image RGB."""
    rng = np.random.default_rng(seed)
    written = []
    for name, count in per_class.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            gray = picture(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            image = Image.fromarray(gray)
            if i % 5 == 0:
                image = image.convert("RGB")
            path = folder / f"img_{i:03d}{suffix}"
            image.save(path)
            written.append(path)
    return written


def brain_volume(rng: np.random.Generator, shape=(48, 48, 30), brain_slices=(5, 25), value=800.0) -> np.ndarray:
    """(x, y, z) float volume: an ellipsoid 'brain' in the z range given, zero elsewhere."""
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]]
    z0, z1 = brain_slices
    inside = ((x - shape[0] / 2) / (shape[0] * 0.4)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    inside &= (z >= z0) & (z < z1)
    return (inside * (value + rng.normal(0, 40, shape))).astype(np.float32)


def nifti(path: Path, volume: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return path


def dicom_series(
    folder: Path,
    volume: np.ndarray,  # (Z, H, W) physical values
    slope: float = 1.0,
    intercept: float = 0.0,
    patient: str = "P001",
    seed: int = 0,
    extension: str = ".dcm",
    uid: str | None = None,
) -> list[Path]:
    """One file per slice, written in shuffled order under names that do not sort by
    position; stored values are (physical - intercept) / slope as uint16."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    series, study = uid or generate_uid(), generate_uid()
    order = rng.permutation(len(volume))
    written = []
    for n, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = patient
        ds.SeriesInstanceUID = series
        ds.StudyInstanceUID = study
        ds.Modality = "MR"
        ds.InstanceNumber = int(rng.integers(1, 1000))  # deliberately useless for ordering
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(-40 + 2.5 * z)]
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        stored = np.rint((volume[z] - intercept) / slope).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{seed}x{n:04d}{extension}"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def dicom_volume(rng: np.random.Generator, slices: int = 12, size: int = 32) -> np.ndarray:
    """(Z, H, W): a disc whose brightness rises with z, so slice order is visible."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    return np.stack([disc * (200.0 + 50.0 * z) + rng.normal(0, 1, (size, size)) * disc for z in range(slices)])


def npz_headers_only(path: Path, **shapes: tuple[int, ...]) -> Path:
    """An .npz whose members are bare .npy headers declaring these uint8 shapes, with no
    data after them: any reader that goes past a header fails, so a message naming the
    shapes shows that only the headers were read."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, shape in shapes.items():
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return path
