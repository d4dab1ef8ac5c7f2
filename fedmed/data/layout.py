"""Find what a dataset folder holds: its format, and the units to decode (image files,
volumes, DICOM series) with their class, split, hospital folder and patient.

Layouts (any of the levels in brackets may be absent):
    ROOT/[<hospital>/][Training|Testing/]<class>/[<patient>/...]<file>
A `labels_csv` replaces the class level. Reading headers is the only I/O here;
decoding pixels is `decode.py`'s job.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedmed.config import DataConfig
from fedmed.errors import FedmedError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
SYSTEM_FOLDERS = {"__macosx", "$recycle.bin", "system volume information"}
SYSTEM_REASON = "system or hidden file"
# A labels-CSV row naming a file that is not there. Like every skip reason it names no
# file: the name goes with it into the skipped list, which only `fedmed data check` shows.
MISSING_REASON = "listed in data.labels_csv but not found under data.path"
# BraTS and similar name each modality of a case `<case>_<modality>.nii.gz`.
MODALITY_SUFFIX = re.compile(r"_(t1|t1ce|t1c|t1n|t1gd|t1w|t2|t2w|t2f|flair|pd|dwi|adc|seg|mask|label)$", re.IGNORECASE)
MASK_SUFFIX = re.compile(r"_(seg|mask|label)$", re.IGNORECASE)
# Folder names that mark a split; validation data joins the training side.
SPLITS = {"training": 0, "train": 0, "validation": 0, "val": 0, "testing": 1, "test": 1}
# Folder names other datasets use for the canonical classes (the Kaggle set's among them).
BUILTIN_ALIASES = {
    "notumor": "no_tumour",
    "no_tumor": "no_tumour",
    "no tumor": "no_tumour",
    "no tumour": "no_tumour",
    "normal": "no_tumour",
    "glioma_tumor": "glioma",
    "meningioma_tumor": "meningioma",
    "pituitary_tumor": "pituitary",
}
FORMATS = ("imagefolder", "nifti", "dicom", "npz")


@dataclass(frozen=True)
class Unit:
    """What decodes together: one image or volume file, or the files of one DICOM series."""

    files: tuple[str, ...]  # paths relative to the root (they never leave this machine)
    label: int
    split: int  # -1: the layout says nothing, 0: train, 1: test
    site: str  # hospital folder, "" when the layout has none
    patient: str  # slices of one patient never straddle train and test
    folder: str = ""  # the class folder it sits in ("" when a CSV gives the label)


@dataclass
class Layout:
    format: str
    units: list[Unit]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    class_folders: dict[str, str] = field(default_factory=dict)  # folder name -> class
    class_dirs: list[str] = field(default_factory=list)  # every class folder, empty or not


class ClassMap:
    """Folder names (or CSV labels) -> class indices."""

    def __init__(self, data: DataConfig) -> None:
        self.names = data.classes
        self.aliases = {name.lower(): name for name in self.names}
        for alias, target in BUILTIN_ALIASES.items():
            if target in self.names:
                self.aliases.setdefault(alias, target)
        for alias, target in data.aliases().items():
            self.aliases[alias.lower()] = target

    def get(self, name: str) -> int | None:
        target = self.aliases.get(name.strip().lower())
        return None if target is None else self.names.index(target)


def list_files(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every file under root (relative POSIX paths, sorted), following linked folders
    once each; and the folders passed over, with the reason."""
    found: list[str] = []
    passed: list[tuple[str, str]] = []
    seen: set[str] = set()

    def unreadable(error: OSError) -> None:
        where = Path(error.filename).relative_to(root).as_posix() if error.filename else "."
        passed.append((f"{where}/", "unreadable folder"))

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        base = Path(folder).relative_to(root)
        if real in seen:  # a link back into the tree
            passed.append((f"{base.as_posix()}/", "folder reached twice through a link"))
            dirs.clear()
            continue
        seen.add(real)
        for name in sorted(dirs):
            if name.startswith(".") or name.lower() in SYSTEM_FOLDERS:
                passed.append((f"{(base / name).as_posix()}/", SYSTEM_REASON))
                dirs.remove(name)
        dirs.sort()
        found.extend((base / name).as_posix() for name in sorted(files))
    return found, passed


def _suffix(rel: str) -> str:
    lower = rel.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else Path(lower).suffix


def _is_system(rel: str) -> bool:
    name = Path(rel).name
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def detect_format(root: Path, files: list[str]) -> str:
    counts = Counter()
    for rel in files:
        suffix = _suffix(rel)
        if _is_system(rel):
            continue
        if suffix in IMAGE_SUFFIXES:
            counts["imagefolder"] += 1
        elif suffix in NIFTI_SUFFIXES:
            counts["nifti"] += 1
        elif suffix == ".npz":
            counts["npz"] += 1
        elif suffix == ".dcm" or _is_dicom(root / rel):
            counts["dicom"] += 1
    if not counts:
        raise FedmedError(
            "no images found (looked for .jpg/.png image folders, .nii/.nii.gz volumes, DICOM files and .npz): "
            "check data.path"
        )
    return counts.most_common(1)[0][0]


def _wants(fmt: str, root: Path, rel: str) -> bool:
    suffix = _suffix(rel)
    if fmt == "imagefolder":
        return suffix in IMAGE_SUFFIXES
    if fmt == "nifti":
        return suffix in NIFTI_SUFFIXES
    if fmt == "dicom":
        return suffix == ".dcm" or (suffix not in IMAGE_SUFFIXES | {".npz", ".txt", ".csv", ".json"} and _is_dicom(root / rel))
    return suffix == ".npz"


def _labels_from_csv(root: Path, data: DataConfig, classes: ClassMap) -> dict[str, int]:
    path = Path(data.labels_csv)
    path = path if path.is_absolute() else root / path
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: the BOM spreadsheets write
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise FedmedError(f"cannot read data.labels_csv ({exc.strerror}): give a CSV of `volume,label` rows") from None
    except (UnicodeDecodeError, csv.Error):
        raise FedmedError("data.labels_csv is not a UTF-8 CSV file: save it as CSV (UTF-8)") from None
    labels: dict[str, int] = {}
    unknown, conflicting = set(), set()
    for row in rows:
        if len(row) < 2 or not row[0].strip() or row[0].strip().lower() in ("volume", "file", "image", "path"):
            continue
        name, label = row[0].strip(), row[1].strip()
        index = classes.get(label)
        if index is None:
            unknown.add(label or "(empty)")
        elif labels.setdefault(name, index) != index:
            conflicting.add(name)
    if unknown:
        raise FedmedError(
            f"data.labels_csv has labels that are not classes: {', '.join(sorted(unknown)[:5])} "
            f"(classes: {', '.join(classes.names)}; map them with data.class_map = \"label:class\")"
        )
    if conflicting:
        raise FedmedError(f"data.labels_csv gives {len(conflicting)} volume(s) two different labels: keep one row per volume")
    if not labels:
        raise FedmedError("data.labels_csv has no `volume,label` rows")
    return labels


def _unmatched_rows(csv_labels: dict[str, int], files: list[str]) -> list[str]:
    """The labels CSV's names that no file under the root answers to, by path or by file
    name (as `scan` looks them up). A file that exists but is not wanted (another
    modality, a mask) is not missing: it has its own reason, or none."""
    present = set(files) | {Path(rel).name for rel in files}
    return sorted(name for name in csv_labels if name not in present)


def _has_site_level(dirs: list[tuple[str, ...]], classes: ClassMap) -> bool:
    """The top folders are hospitals when none of them is a split or a class, and
    the folders below them are."""

    def known(name: str) -> bool:
        return name.lower() in SPLITS or classes.get(name) is not None

    tops = {parts[0] for parts in dirs if parts}
    return bool(tops) and not any(known(t) for t in tops) and any(len(p) >= 2 and known(p[1]) for p in dirs)


def _stem(rel: str) -> str:
    name = Path(rel).name
    return name[: -len(_suffix(rel))] if _suffix(rel) else name


def _volume_patient(rel: str) -> str:
    """BraTS-style `<case>_<modality>.nii.gz`: every modality of a case is one patient."""
    return (Path(rel).parent / MODALITY_SUFFIX.sub("", _stem(rel))).as_posix()


FORMAT_NOUNS = {"imagefolder": "an image", "nifti": "a NIfTI volume", "dicom": "a DICOM file", "npz": "an .npz archive"}


def scan(root: Path, files: list[str], fmt: str, data: DataConfig, passed: list[tuple[str, str]] = ()) -> Layout:
    """Assign every wanted file to a unit, or to the skipped list with a reason."""
    classes = ClassMap(data)
    csv_labels = _labels_from_csv(root, data, classes) if data.labels_csv else None
    layout = Layout(format=fmt, units=[], skipped=list(passed))
    wanted = []
    csv_path = Path(data.labels_csv).as_posix() if data.labels_csv else None
    for rel in files:
        if _is_system(rel):
            layout.skipped.append((rel, SYSTEM_REASON))
        elif rel == csv_path:
            continue
        elif fmt == "nifti" and data.modality and _suffix(rel) in NIFTI_SUFFIXES and not _stem(rel).lower().endswith(
            f"_{data.modality.lower()}"
        ):
            continue  # another modality of the same case: not wanted, not an error
        elif fmt == "nifti" and MASK_SUFFIX.search(_stem(rel)):
            layout.skipped.append((rel, "segmentation mask, not an image"))
        elif _wants(fmt, root, rel):
            wanted.append(rel)
        else:
            layout.skipped.append((rel, f"not {FORMAT_NOUNS[fmt]}"))
    dirs = [Path(rel).parent.parts for rel in wanted]
    sited = _has_site_level(dirs, classes)
    unknown: Counter[str] = Counter()
    placed: list[tuple[str, int, int, str, str, str]] = []  # rel, label, split, site, patient, class folder
    for rel in wanted:
        parts = list(Path(rel).parent.parts)
        site = parts.pop(0) if sited and parts else ""
        split = SPLITS.get(parts[0].lower(), -1) if parts else -1
        if split >= 0:
            parts.pop(0)
        if csv_labels is not None:
            label = csv_labels.get(rel, csv_labels.get(Path(rel).name))
            if label is None:
                layout.skipped.append((rel, "not listed in data.labels_csv"))
                continue
            folder, below = "", []  # the CSV names volumes: each is its own patient
        else:
            if not parts:
                layout.skipped.append((rel, "not inside a class folder"))
                continue
            label = classes.get(parts[0])
            if label is None:
                unknown[parts[0]] += 1
                continue
            layout.class_folders[parts[0]] = classes.names[label]
            folder = "/".join(Path(rel).parent.parts[: len(Path(rel).parent.parts) - len(parts) + 1])
            below = parts[1:]
        # A folder below the class folder is a patient (or study); otherwise the file
        # (a volume: its case) is. DICOM adds the PatientID (see _dicom_series).
        if below:
            patient = f"{folder}/{below[0]}"
        elif fmt == "dicom":
            patient = ""
        else:
            patient = _volume_patient(rel) if fmt == "nifti" else rel
        placed.append((rel, label, split, site, patient, folder))
    if csv_labels is not None:
        layout.skipped.extend((name, MISSING_REASON) for name in _unmatched_rows(csv_labels, files))
    if unknown:
        names = ", ".join(f"'{n}'" for n in sorted(unknown)[:6])
        raise FedmedError(
            f"unknown class folder(s) {names}: the classes are {', '.join(classes.names)}; "
            f"map a folder with data.class_map = \"folder:class\" or list the classes in data.classes"
        )
    if fmt == "dicom":
        layout.units = _dicom_series(root, placed, layout.skipped, data.max_pixels)
    else:
        layout.units = [Unit((rel,), label, split, site, patient, folder) for rel, label, split, site, patient, folder in placed]
    layout.sites = sorted({u.site for u in layout.units if u.site})
    if csv_labels is None:
        layout.class_dirs = _class_dirs(root, sited, classes)
    return layout


def _class_dirs(root: Path, sited: bool, classes: ClassMap) -> list[str]:
    """Folders standing where a class folder stands, whether or not they hold images."""
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs.sort()
        parts = list(Path(folder).relative_to(root).parts)
        rest = parts[1:] if sited else parts
        if rest and rest[0].lower() in SPLITS:
            rest = rest[1:]
        if len(rest) == 1 and classes.get(rest[0]) is not None:
            found.append("/".join(parts))
    return found


def _dicom_shape(ds) -> tuple[int, ...]:
    """(columns, rows[, frames]) as the header declares them; () when it does not say."""
    try:
        columns, rows, frames = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return ()  # malformed: decoding reports it
    return (columns, rows) + ((frames,) if frames > 1 else ())


def _dicom_series(root: Path, placed: list, skipped: list[tuple[str, str]], max_pixels: int) -> list[Unit]:
    """Group DICOM files by SeriesInstanceUID; the patient is the PatientID (hashed here,
    never stored), or the series when there is none. A file whose header declares more
    than `max_pixels` is skipped here, before its pixels are ever read."""
    from fedmed.data.decode import oversize, read_dicom

    series: dict[str, list] = {}
    for rel, label, split, site, patient, folder in placed:
        try:
            ds = read_dicom(root / rel, header_only=True)
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            who = str(ds.get("PatientID", "") or "")
            too_large = oversize("DICOM file", _dicom_shape(ds), max_pixels)
        except Exception:  # noqa: BLE001 - a damaged file raises almost anything (struct.error, NotImplementedError, ...)
            skipped.append((rel, "corrupt or truncated DICOM file"))
            continue
        if too_large:
            skipped.append((rel, too_large))
            continue
        if not uid:
            skipped.append((rel, "DICOM file has no SeriesInstanceUID"))
            continue
        # The patient folder and the PatientID must both agree (anonymised exports often
        # share one PatientID); with neither, each series is a patient.
        key = f"{patient or folder}|{who or ('' if patient else uid)}"
        key = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        series.setdefault(uid, []).append((rel, label, split, site, key, folder))
    units = []
    for _uid, members in sorted(series.items(), key=lambda item: item[1][0][0]):
        if len({(m[1], m[2], m[3]) for m in members}) > 1:
            skipped.extend((m[0], "DICOM series spans several class, split or hospital folders") for m in members)
            continue
        _, label, split, site, key, folder = members[0]
        units.append(Unit(tuple(m[0] for m in members), label, split, site, key, folder))
    return units
