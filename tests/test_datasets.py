"""Reading datasets from disk: every format, the patient-level split, duplicates,
the cache, and each kind of bad input."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmed import config as config_mod
from fedmed.config import SkewConfig
from fedmed.data.dataset import load_dataset, usable
from fedmed.data.decode import read_dicom_series
from fedmed.data.partition import TEST, TRAIN, assign, split_by_patient
from fedmed.errors import FedmedError
from tests import mri_fixtures as fx
from tests.conftest import assert_clean_failure, fedmed_process

CLASSES = ("glioma", "meningioma", "no_tumour", "pituitary")


@pytest.fixture
def data_config(tmp_path):
    def make(path: Path, *extra: str):
        values = {"data.source": "disk", "data.path": str(path), "data.cache_dir": str(tmp_path / "cache")}
        return config_mod.load(None, ["data.image_size=32", "data.workers=1", *extra], values).data

    return make


def kaggle(root: Path, train: int = 6, test: int = 3) -> Path:
    fx.image_folder(root, dict.fromkeys(fx.KAGGLE, train), seed=1, split="Training", suffix=".jpg")
    fx.image_folder(root, dict.fromkeys(fx.KAGGLE, test), seed=2, split="Testing", suffix=".jpg")
    return root


def per_class(ds, split: int) -> list[int]:
    return np.bincount(ds.labels[ds.split == split], minlength=4).tolist()


# ---- formats ------------------------------------------------------------------


def test_kaggle_layout_counts_each_class_and_split(tmp_path, data_config):
    data = data_config(kaggle(tmp_path / "kaggle"))
    ds = load_dataset(data)
    assert ds.manifest["format"] == "imagefolder"
    assert per_class(ds, TRAIN) == [6, 6, 6, 6]
    assert per_class(ds, TEST) == [3, 3, 3, 3]
    assert ds.images.shape == (36, 32, 32) and ds.images.dtype == np.uint8
    assert ds.manifest["class_folders"]["notumor"] == "no_tumour"
    assert set(ds.manifest["source_modes"]) == {"L", "RGB"}


def test_a_process_that_finishes_decoding_second_keeps_the_cache_another_is_reading(tmp_path, data_config, monkeypatch):
    """Two nodes on one machine decoding the same images at once: the second to finish
    must not replace (delete) the cache the first is already reading."""
    from fedmed.data import dataset as dataset_mod

    data = data_config(kaggle(tmp_path / "kaggle"))
    load_dataset(data)
    cache = next((tmp_path / "cache" / "datasets").iterdir())
    first = (cache / "index.npz").stat().st_ino
    real, checks = dataset_mod._complete, []

    def checked_before_it_appeared(path: Path) -> bool:
        checks.append(path)
        return False if len(checks) == 1 else real(path)

    monkeypatch.setattr(dataset_mod, "_complete", checked_before_it_appeared)
    load_dataset(data)  # decodes again, as a process that looked before the other's cache appeared
    assert (cache / "index.npz").stat().st_ino == first


def test_class_map_maps_other_folder_names(tmp_path, data_config):
    fx.image_folder(tmp_path / "d", {"tumour": 4, "healthy": 4})
    data = data_config(tmp_path / "d", 'data.classes="healthy,tumour"')
    assert np.bincount(load_dataset(data).labels).tolist() == [4, 4]
    fx.image_folder(tmp_path / "e", {"glioma_tumor": 3, "normal": 3, "lesion": 3})
    data = data_config(tmp_path / "e", 'data.class_map="lesion:meningioma"')
    assert np.bincount(load_dataset(data).labels, minlength=4).tolist() == [3, 3, 3, 0]


def test_nifti_slab_keeps_the_central_brain_slices(tmp_path, data_config):
    rng = np.random.default_rng(0)
    fx.nifti(tmp_path / "vols" / "glioma" / "case1.nii.gz", fx.brain_volume(rng, brain_slices=(5, 25)))
    fx.nifti(tmp_path / "vols" / "pituitary" / "case2.nii", fx.brain_volume(rng, brain_slices=(0, 30)))
    ds = load_dataset(data_config(tmp_path / "vols", "data.slab=0.5"))
    assert ds.manifest["format"] == "nifti"
    # 20 brain slices -> central 10; 30 -> central 15 (empty slices 0-4 and 25-29 never count)
    assert np.bincount(ds.labels, minlength=4).tolist() == [10, 0, 0, 15]
    assert len(load_dataset(data_config(tmp_path / "vols", "data.slab=1.0"))) == 50


def test_nifti_skips_slices_with_too_little_foreground(tmp_path, data_config):
    rng = np.random.default_rng(0)
    volume = fx.brain_volume(rng, brain_slices=(0, 20))
    volume[:, :, 10:] = 0
    volume[20:24, 20:24, 10:] = 800  # a speck: 16 of 2304 pixels, under 5 %
    fx.nifti(tmp_path / "v" / "glioma" / "a.nii.gz", volume)
    fx.nifti(tmp_path / "v" / "meningioma" / "b.nii.gz", fx.brain_volume(rng, brain_slices=(0, 20)))
    ds = load_dataset(data_config(tmp_path / "v", "data.slab=1.0"))
    assert np.bincount(ds.labels, minlength=4).tolist() == [10, 20, 0, 0]


def test_nifti_labels_from_csv_and_brats_modality(tmp_path, data_config):
    rng = np.random.default_rng(0)
    root = tmp_path / "brats"
    for case, label in (("c1", "glioma"), ("c2", "meningioma")):
        for modality in ("t1", "flair", "seg"):
            fx.nifti(root / case / f"{case}_{modality}.nii.gz", fx.brain_volume(rng))
        (root / "labels.csv").open("a").write(f"{case}/{case}_flair.nii.gz,{label}\n")
    (root / "labels.csv").write_text("volume,label\n" + (root / "labels.csv").read_text())
    ds = load_dataset(data_config(root, "data.labels_csv=labels.csv", "data.modality=flair", "data.slab=1.0"))
    assert np.bincount(ds.labels, minlength=4).tolist() == [20, 20, 0, 0]
    assert len(np.unique(ds.patient)) == 2


def test_dicom_series_is_ordered_along_the_normal_with_rescale_applied(tmp_path):
    rng = np.random.default_rng(0)
    volume = fx.dicom_volume(rng, slices=10)
    fx.dicom_series(tmp_path / "s", volume, slope=2.0, intercept=-1024.0, seed=3, extension="")
    files = tuple(sorted(p.name for p in (tmp_path / "s").iterdir()))
    read, skipped = read_dicom_series(tmp_path / "s", files)
    assert not skipped
    np.testing.assert_allclose(read, np.rint((volume + 1024.0) / 2.0) * 2.0 - 1024.0)


def test_dicom_folder_groups_series_by_uid_and_labels_by_folder(tmp_path, data_config):
    rng = np.random.default_rng(0)
    fx.dicom_series(tmp_path / "d" / "glioma" / "study1", fx.dicom_volume(rng), patient="A", seed=1)
    fx.dicom_series(tmp_path / "d" / "glioma" / "study1", fx.dicom_volume(rng), patient="A", seed=2)  # 2nd series, same folder
    fx.dicom_series(tmp_path / "d" / "pituitary" / "x", fx.dicom_volume(rng), patient="B", seed=3, extension="")
    ds = load_dataset(data_config(tmp_path / "d", "data.slab=1.0", "data.min_foreground=0"))
    assert ds.manifest["format"] == "dicom"
    assert np.bincount(ds.labels, minlength=4).tolist() == [24, 0, 0, 12]
    assert len(np.unique(ds.patient)) == 2  # two series of patient A are one patient
    brightness = ds.images[ds.labels == 3].reshape(12, -1).mean(1)
    assert np.all(np.diff(brightness) > 0)  # written shuffled, read back in slice order


def test_npz_medmnist_layout(tmp_path, data_config):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4).reshape(n, 1)
    np.savez(tmp_path / "brainmnist.npz", **arrays)
    ds = load_dataset(data_config(tmp_path / "brainmnist.npz"))
    assert per_class(ds, TRAIN) == [4, 4, 4, 4] and per_class(ds, TEST) == [2, 2, 2, 2]
    arrays["test_labels"][0] = 7
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FedmedError, match="test_labels run 0..7"):
        load_dataset(data_config(tmp_path / "bad.npz"))


# ---- patient-level integrity ----------------------------------------------------


def test_slices_of_one_volume_never_straddle_split_or_hospitals(tmp_path, data_config):
    rng = np.random.default_rng(0)
    for i in range(12):
        fx.nifti(tmp_path / "v" / CLASSES[i % 4] / f"case{i}.nii.gz", fx.brain_volume(rng))
    data = data_config(tmp_path / "v", "data.hospitals=2", "data.test_fraction=0.25")
    ds = load_dataset(data)
    parts = assign(ds, data, SkewConfig(), seed=0)
    for patient in np.unique(ds.patient):
        mine = ds.patient == patient
        assert len(set(parts.split[mine].tolist())) == 1
        assert len(set(parts.site[mine].tolist())) == 1
    assert 0 < (parts.split == TEST).sum() < len(ds)
    np.testing.assert_array_equal(parts.site, assign(ds, data, SkewConfig(), seed=0).site)  # seeded


def test_duplicates_across_train_and_test_are_found_and_left_out(tmp_path, data_config):
    root = kaggle(tmp_path / "k")
    for i in range(3):
        shutil.copy(root / "Training" / "glioma" / f"img_00{i}.jpg", root / "Testing" / "glioma" / f"copy_{i}.jpg")
    ds = load_dataset(data_config(root))
    split, _, dups = split_by_patient(ds, data_config(root), seed=0)
    assert dups["train_test"] == 3 and dups["left_out"] == 3
    assert (split == -1).sum() == 3
    _, _, kept = split_by_patient(ds, data_config(root, "data.dedupe=false"), seed=0)
    assert kept["train_test"] == 3 and kept["left_out"] == 0


def test_duplicates_without_a_split_land_on_the_same_side(tmp_path, data_config):
    fx.image_folder(tmp_path / "d", dict.fromkeys(CLASSES, 10))
    for i in range(10):
        shutil.copy(tmp_path / "d" / "glioma" / f"img_00{i}.png", tmp_path / "d" / "glioma" / f"dup_{i}.png")
    data = data_config(tmp_path / "d", "data.test_fraction=0.5")
    ds = load_dataset(data)
    split, _, dups = split_by_patient(ds, data, seed=0)
    assert dups["train_test"] == 0 and dups["within_train"] + dups["within_test"] == 10


# ---- the cache --------------------------------------------------------------------


def test_second_load_reads_the_cache_and_an_edit_invalidates_it(tmp_path, data_config):
    root = kaggle(tmp_path / "k", train=2, test=1)
    data = data_config(root)
    first = load_dataset(data)
    assert isinstance(first.images, np.memmap)
    again = load_dataset(data)
    assert again.manifest["digest"] == first.manifest["digest"]
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
    Image.fromarray(fx.picture(np.random.default_rng(9), 50, 50)).save(root / "Training" / "glioma" / "new.png")
    changed = load_dataset(data)
    assert changed.manifest["digest"] != first.manifest["digest"] and len(changed) == len(first) + 1


# ---- bad input --------------------------------------------------------------------


def bad_files(root: Path) -> None:
    """One of each: truncated, corrupt, stray, unreadable, odd modes."""
    good = root / "Training" / "glioma" / "img_001.jpg"
    data = good.read_bytes()
    (root / "Training" / "glioma" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "Training" / "glioma" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "Training" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "Training" / "meningioma" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "Training" / "meningioma" / "notes.txt").write_text("scanner notes")
    (root / "Training" / "meningioma" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    rng = np.random.default_rng(5)
    Image.fromarray(fx.picture(rng, 40, 40)).convert("RGBA").save(root / "Training" / "pituitary" / "rgba.png")
    Image.fromarray(fx.picture(rng, 40, 40)).convert("P").save(root / "Training" / "pituitary" / "palette.png")
    Image.fromarray(fx.picture(rng, 40, 40).astype(np.uint16) * 200).save(root / "Training" / "pituitary" / "wide.png")
    (root / "Testing" / "pituitary" / "empty_dir").mkdir()
    for path in (root / "Testing" / "meningioma").iterdir():
        path.unlink()


def test_bad_files_are_skipped_counted_and_reported(tmp_path, data_config):
    root = kaggle(tmp_path / "k")
    bad_files(root)
    data = data_config(root)
    ds = load_dataset(data)
    reasons = dict(ds.skipped)
    assert reasons["Training/glioma/truncated.jpg"] == "truncated image"
    assert reasons["Training/glioma/corrupt.png"] in ("not a readable image", "corrupt image")
    assert reasons["Training/meningioma/gone.jpg"].startswith("unreadable file")
    assert reasons["Training/.DS_Store"] == reasons["Training/meningioma/Thumbs.db"] == "system or hidden file"
    assert reasons["Training/meningioma/notes.txt"] == "not an image"
    assert per_class(ds, TRAIN) == [6, 6, 6, 9]  # RGBA, palette and 16-bit images are read
    assert ds.skip_counts(include_system=False).total() == 4
    warnings = usable(ds, data)
    assert any("4 files skipped" in w for w in warnings)
    assert "1 class folder(s) hold no usable image: Testing/meningioma" in warnings
    with pytest.raises(FedmedError, match="4 files could not be used .* data.strict"):
        usable(ds, data_config(root, "data.strict=true"))


def test_unknown_class_folder_is_an_error_naming_it(tmp_path, data_config):
    root = kaggle(tmp_path / "k", train=2, test=1)
    fx.image_folder(root / "Training", {"astrocytoma": 2})
    with pytest.raises(FedmedError, match="unknown class folder.*'astrocytoma'.*data.class_map"):
        load_dataset(data_config(root))


@pytest.mark.parametrize("case", ["empty", "only_junk", "one_class"])
def test_unusable_datasets_fail_with_the_reason(tmp_path, data_config, case):
    root = tmp_path / case
    root.mkdir()
    if case == "only_junk":
        (root / "glioma").mkdir()
        (root / "glioma" / "a.jpg").write_bytes(b"not a jpeg")
        (root / "glioma" / "b.jpg").write_bytes(b"")
    if case == "one_class":
        fx.image_folder(root, {"glioma": 5})
    match = {"empty": "no images found", "only_junk": "no usable images .*2 files skipped", "one_class": "fewer than two classes"}[case]
    with pytest.raises(FedmedError, match=match):
        data = data_config(root)
        usable(load_dataset(data), data)


def test_dicom_without_pixels_or_with_undecodable_compression_is_skipped_with_reason(tmp_path, data_config):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    rng = np.random.default_rng(0)
    ok = fx.dicom_series(tmp_path / "d" / "glioma" / "s1", fx.dicom_volume(rng), seed=1)
    fx.dicom_series(tmp_path / "d" / "meningioma" / "s2", fx.dicom_volume(rng), patient="B", seed=2)
    no_pixels = pydicom.dcmread(ok[0])
    del no_pixels.PixelData
    no_pixels.save_as(ok[0])
    jp2 = fx.dicom_series(tmp_path / "d" / "pituitary" / "s3", fx.dicom_volume(rng, slices=3), patient="C", seed=3)
    for path in jp2:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not really jpeg 2000"])
        ds.save_as(path)
    ds = load_dataset(data_config(tmp_path / "d", "data.slab=1.0", "data.min_foreground=0"))
    reasons = ds.skip_counts()
    assert reasons["DICOM file has no pixel data"] == 1
    compressed = [r for r in reasons if r.startswith("transfer syntax")]
    assert compressed and "JPEG 2000" in compressed[0] and reasons[compressed[0]] == 3
    assert np.bincount(ds.labels, minlength=4).tolist() == [11, 12, 0, 0]


def test_truncated_nifti_is_skipped(tmp_path, data_config):
    rng = np.random.default_rng(0)
    for i, name in enumerate(("glioma", "meningioma")):
        fx.nifti(tmp_path / "v" / name / f"c{i}.nii.gz", fx.brain_volume(rng))
    whole = fx.nifti(tmp_path / "v" / "glioma" / "broken.nii.gz", fx.brain_volume(rng)).read_bytes()
    (tmp_path / "v" / "glioma" / "broken.nii.gz").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "v" / "glioma" / "notgz.nii.gz").write_bytes(gzip.compress(b"\x00" * 100))
    ds = load_dataset(data_config(tmp_path / "v"))
    assert ds.skip_counts() == {"corrupt or truncated NIfTI volume": 2}
    assert len(np.unique(ds.patient)) == 2


def test_missing_path_is_one_clear_error(tmp_path, data_config):
    with pytest.raises(FedmedError, match="data.path does not exist"):
        load_dataset(data_config(tmp_path / "nowhere"))


# ---- harder cases -------------------------------------------------------------------


def test_damaged_dicom_files_are_skipped_not_fatal(tmp_path, data_config):
    import pydicom

    rng = np.random.default_rng(0)
    files = fx.dicom_series(tmp_path / "d" / "glioma" / "p1", fx.dicom_volume(rng), patient="A", seed=1)
    fx.dicom_series(tmp_path / "d" / "meningioma" / "p2", fx.dicom_volume(rng), patient="B", seed=2)
    files[0].write_bytes(files[0].read_bytes()[:154])  # cut inside the header
    raw = bytearray(files[1].read_bytes())
    raw[140:160] = b"\xff" * 20  # garbage where the meta group length sits
    files[1].write_bytes(bytes(raw))
    private = pydicom.dcmread(files[2])
    private.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"  # a vendor's private syntax
    private.save_as(files[2])
    ds = load_dataset(data_config(tmp_path / "d", "data.slab=1.0", "data.min_foreground=0"))
    reasons = ds.skip_counts()
    assert sum(reasons.values()) == 3
    assert any("1.2.840.113619.5.2" in r for r in reasons)
    assert np.bincount(ds.labels, minlength=4).tolist() == [9, 12, 0, 0]


def test_anonymised_dicom_patients_are_told_apart_by_folder(tmp_path, data_config):
    rng = np.random.default_rng(0)
    for i in range(4):
        for k, name in enumerate(("glioma", "pituitary")):
            fx.dicom_series(tmp_path / "d" / name / f"case{i}", fx.dicom_volume(rng), patient="ANONYMOUS", seed=10 * i + k)
    ds = load_dataset(data_config(tmp_path / "d", "data.slab=1.0", "data.min_foreground=0"))
    assert len(np.unique(ds.patient)) == 8


def test_damaged_npz_and_labels_csv_are_clear_errors(tmp_path, data_config):
    np.savez(tmp_path / "ok.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.arange(4))
    whole = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FedmedError, match="cannot read the .npz archive"):
        load_dataset(data_config(tmp_path / "cut.npz"))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "renamed.npz")
    with pytest.raises(FedmedError, match="cannot read the .npz archive"):
        load_dataset(data_config(tmp_path / "renamed.npz"))

    rng = np.random.default_rng(0)
    root = tmp_path / "vols"
    for i in range(4):
        fx.nifti(root / "scans" / f"c{i}.nii.gz", fx.brain_volume(rng))
    (root / "bom.csv").write_bytes("\ufeffvolume,label\n".encode() + b"".join(f"scans/c{i}.nii.gz,{CLASSES[i]}\n".encode() for i in range(4)))
    ds = load_dataset(data_config(root, "data.labels_csv=bom.csv"))
    assert len(np.unique(ds.patient)) == 4  # volumes in one folder are still four patients
    (root / "latin1.csv").write_bytes("scans/c0.nii.gz,tumeur à droite\n".encode("latin-1"))
    with pytest.raises(FedmedError, match="not a UTF-8 CSV"):
        load_dataset(data_config(root, "data.labels_csv=latin1.csv"))
    (root / "twice.csv").write_text("scans/c0.nii.gz,glioma\nscans/c0.nii.gz,pituitary\n")
    with pytest.raises(FedmedError, match="two different labels"):
        load_dataset(data_config(root, "data.labels_csv=twice.csv"))


def test_modalities_of_one_case_are_one_patient_and_masks_are_not_images(tmp_path, data_config):
    rng = np.random.default_rng(0)
    for i in range(6):
        for modality in ("t1", "t2", "flair", "seg"):
            fx.nifti(tmp_path / "v" / CLASSES[i % 2] / f"case{i}_{modality}.nii.gz", fx.brain_volume(rng))
    data = data_config(tmp_path / "v", "data.hospitals=2", "data.test_fraction=0.34")
    ds = load_dataset(data)
    assert len(np.unique(ds.patient)) == 6
    assert ds.skip_counts() == {"segmentation mask, not an image": 6}
    parts = assign(ds, data, SkewConfig(), seed=0)
    for patient in np.unique(ds.patient):
        assert len(set(parts.split[ds.patient == patient].tolist())) == 1


def test_blank_image_files_are_skipped_and_tie_no_patients_together(tmp_path, data_config):
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "d" / CLASSES[i % 2] / f"patient{i:02d}"
        folder.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(fx.picture(rng, 40, 40)).save(folder / f"{k}.png")
        Image.fromarray(np.full((40, 40), 7 * i, np.uint8)).save(folder / "blank.png")
    data = data_config(tmp_path / "d", "data.test_fraction=0.34")
    ds = load_dataset(data)
    assert ds.skip_counts() == {"blank image (constant intensity)": 12}
    split, groups, dups = split_by_patient(ds, data, seed=0)
    assert len(np.unique(groups)) == 12 and (split == TEST).sum() == 12
    assert dups["train_test"] == 0


def test_hospital_folders_each_keep_a_test_split(tmp_path, data_config):
    for h, n in (("big", 20), ("small", 2)):
        fx.image_folder(tmp_path / "d" / h, {"glioma": n, "pituitary": n}, seed=len(h))
    data = data_config(tmp_path / "d", "data.partition=folders", "data.hospitals=2")
    ds = load_dataset(data)
    assert ds.manifest["sites"] == ["big", "small"]
    for seed in range(5):
        parts = assign(ds, data, SkewConfig(), seed)
        assert [len(parts.indices(TEST, h)) for h in (0, 1)] == [8, 2]


def test_linked_folders_are_read_and_hidden_folders_ignored(tmp_path, data_config):
    fx.image_folder(tmp_path / "elsewhere", {"pituitary": 3})
    fx.image_folder(tmp_path / "d", {"glioma": 3, ".ipynb_checkpoints": 2})
    (tmp_path / "d" / "pituitary").symlink_to(tmp_path / "elsewhere" / "pituitary")
    (tmp_path / "d" / "glioma" / "loop").symlink_to(tmp_path / "d")
    ds = load_dataset(data_config(tmp_path / "d"))
    assert np.bincount(ds.labels, minlength=4).tolist() == [3, 0, 0, 3]
    reasons = dict(ds.skipped)
    assert reasons[".ipynb_checkpoints/"] == "system or hidden file"
    assert reasons["glioma/loop/"] == "folder reached twice through a link"


def test_thin_images_are_skipped(tmp_path, data_config):
    fx.image_folder(tmp_path / "d", {"glioma": 2, "pituitary": 2})
    Image.new("L", (20000, 1)).save(tmp_path / "d" / "glioma" / "line.png")
    assert dict(load_dataset(data_config(tmp_path / "d")).skipped)["glioma/line.png"] == "image is 20000x1 pixels: not a slice"


def test_zscore_normalisation_and_signed_volumes(tmp_path, data_config):
    rng = np.random.default_rng(0)
    volume = fx.brain_volume(rng, brain_slices=(5, 25)) - 1000.0  # background at -1000, like CT-ish units
    fx.nifti(tmp_path / "v" / "glioma" / "a.nii.gz", volume)
    fx.nifti(tmp_path / "v" / "pituitary" / "b.nii.gz", fx.brain_volume(rng, brain_slices=(5, 25)))
    ds = load_dataset(data_config(tmp_path / "v", "data.normalise=zscore", "data.slab=1.0"))
    assert np.bincount(ds.labels, minlength=4).tolist() == [20, 0, 0, 20]  # empty slices still found
    brain = ds.images[ds.images > 0]
    assert 100 < brain.mean() < 160  # z-scores centred in the 0-255 range


def test_an_interrupted_cache_is_rebuilt(tmp_path, data_config):
    root = kaggle(tmp_path / "k", train=2, test=1)
    data = data_config(root)
    first = load_dataset(data)
    cache = tmp_path / "cache" / "datasets" / first.manifest["digest"]
    (cache / "index.npz").unlink()
    assert len(load_dataset(data)) == len(first)


# ---- bad input in one line, or skipped with a reason (issue 16) ----------------------


def two_class_images(root: Path, per_class: int = 4) -> Path:
    fx.image_folder(root, {"glioma": per_class, "pituitary": per_class}, suffix=".png")
    return root


def check_command(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    """`fedmed data check` arguments for a small dataset, with its own cache."""
    settings = ["data.image_size=32", "data.hospitals=1", f"data.cache_dir={tmp_path / 'cache'}", *extra]
    return ["data", "check", str(path), *(arg for setting in settings for arg in ("--set", setting))]


def test_npz_with_an_empty_split_stops_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "empty.npz",
        train_images=rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
        train_labels=np.arange(8) % 4,
        test_images=np.zeros((0, 28, 28), np.uint8),
        test_labels=np.zeros(0, np.int64),
    )
    result = fedmed_process(*check_command(tmp_path / "empty.npz", tmp_path))
    assert_clean_failure(result, "the .npz's test split is empty (test_images holds no image): put the test images in test_images")


@pytest.mark.parametrize("bad", ["nan", "inf", "blank"])
def test_npz_with_non_finite_or_blank_images_is_refused_with_a_count(tmp_path, data_config, bad):
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 1, (8, 28, 28)).astype(np.float32)
    train[[1, 4, 6]] = {"nan": np.nan, "inf": np.inf, "blank": 0.5}[bad]
    np.savez(tmp_path / "a.npz", train_images=train, train_labels=np.arange(8) % 4)
    expected = "not finite (NaN or infinite)" if bad != "blank" else "blank (one constant value)"
    with pytest.raises(FedmedError, match=rf"^3 of 8 training images \(train_images\) are {re.escape(expected)}"):
        load_dataset(data_config(tmp_path / "a.npz"))


@pytest.mark.parametrize("source", ["tiff", "nifti"])
def test_non_finite_image_files_are_skipped_with_the_reason(tmp_path, data_config, source):
    rng = np.random.default_rng(0)
    root = two_class_images(tmp_path / "d") if source == "tiff" else tmp_path / "d"
    if source == "tiff":
        values = fx.picture(rng, 40, 40).astype(np.float32)
        values[5, 5] = np.nan
        Image.fromarray(values, mode="F").save(root / "glioma" / "nan.tif")
        bad, reason = "glioma/nan.tif", "image is not finite (NaN or infinite pixels)"
    else:
        for i, name in enumerate(("glioma", "pituitary")):
            fx.nifti(root / name / f"c{i}.nii.gz", fx.brain_volume(rng))
        volume = fx.brain_volume(rng)
        volume[20, 20, 10] = np.inf
        fx.nifti(root / "glioma" / "inf.nii.gz", volume)
        bad, reason = "glioma/inf.nii.gz", "volume has infinite voxels"
    assert dict(load_dataset(data_config(root)).skipped) == {bad: reason}


def test_an_image_declaring_too_many_pixels_is_skipped_before_decoding(tmp_path):
    root = two_class_images(tmp_path / "d")
    Image.new("1", (13000, 13000)).save(root / "glioma" / "bomb.png")  # 20 KB on disk, 169 megapixels
    result = fedmed_process(*check_command(root, tmp_path))
    assert result.returncode == 0, result.stderr
    reason = "image declares 13000x13000 pixels (169,000,000), over data.max_pixels = 25,000,000"
    assert f"skipped: {reason}: 1" in " ".join(result.stdout.split())


def test_pillows_bomb_guard_does_not_override_data_max_pixels(tmp_path, data_config, monkeypatch):
    from PIL import Image as pil

    monkeypatch.setattr(pil, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses from twice this
    ds = load_dataset(data_config(two_class_images(tmp_path / "d")))  # 40-90 pixels square
    assert len(ds) == 8 and not ds.skipped
    assert pil.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("source", ["dicom", "nifti"])
def test_volumes_over_max_pixels_are_skipped_from_their_headers(tmp_path, data_config, source):
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    if source == "dicom":
        fx.dicom_series(root / "glioma" / "s1", fx.dicom_volume(rng, slices=3), seed=1)
        expected = {"DICOM file declares 32x32 pixels (1,024), over data.max_pixels = 1,000": 3}
    else:
        fx.nifti(root / "glioma" / "c1.nii.gz", fx.brain_volume(rng, shape=(10, 10, 11)))
        expected = {"NIfTI volume declares 10x10x11 voxels (1,100), over data.max_pixels = 1,000": 1}
    ds = load_dataset(data_config(root, "data.max_pixels=1000"))
    assert ds.skip_counts() == expected and len(ds) == 0


def test_an_npz_declaring_oversize_images_is_refused_from_its_headers(tmp_path):
    archive = fx.npz_headers_only(tmp_path / "big.npz", train_images=(1, 20000, 20000), train_labels=(1,))
    result = fedmed_process(*check_command(archive, tmp_path))
    assert_clean_failure(
        result,
        "each image of train_images declares 20000x20000 pixels (400,000,000), over data.max_pixels = 25,000,000: "
        "resize them in the .npz, or raise data.max_pixels",
    )


def labelled_by_csv(root: Path) -> Path:
    """Images in one folder, labelled by a CSV that also lists a file that is not there."""
    fx.image_folder(root, {"scans": 8})
    rows = [f"scans/img_{i:03d}.png,{CLASSES[3 * (i % 2)]}" for i in range(8)] + ["scans/patient_4711.png,glioma"]
    (root / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    return root


def test_a_labels_csv_row_for_a_missing_file_is_reported_on_the_hospitals_machine_only(tmp_path):
    result = fedmed_process(*check_command(labelled_by_csv(tmp_path / "d"), tmp_path, "data.labels_csv=labels.csv"))
    assert result.returncode == 0, result.stderr
    assert "skipped: listed in data.labels_csv but not found under data.path: 1" in " ".join(result.stdout.split())
    assert result.stdout.count("patient_4711") == 1  # in the skipped files' table only, not in the warning a run would print


def test_a_labels_csv_row_for_a_missing_file_fails_under_strict(tmp_path):
    result = fedmed_process(*check_command(labelled_by_csv(tmp_path / "d"), tmp_path, "data.labels_csv=labels.csv"), "--strict")
    assert_clean_failure(result, "1 files could not be used (listed in data.labels_csv but not found under data.path: 1)")
    assert "patient_4711" not in result.stderr


def test_max_pixels_must_be_positive(tmp_path, data_config):
    with pytest.raises(FedmedError, match="max_pixels"):
        data_config(tmp_path, "data.max_pixels=0")


def test_a_validation_split_holds_back_whole_patients():
    import torch

    from fedmed.data.sites import Split, hold_out

    patients = np.repeat(np.arange(10), 3)  # 10 patients, 3 images each
    train = Split(torch.arange(30, dtype=torch.float32).reshape(30, 1, 1, 1), torch.arange(30) % 4)
    kept, val = hold_out(train, patients, 0.2, seed=0, index=0)
    held = {int(p) for p in patients[np.isin(np.arange(30), val.x.flatten().long().numpy())]}
    trained = {int(p) for p in patients[np.isin(np.arange(30), kept.x.flatten().long().numpy())]}
    assert len(held) == 2 and len(val) == 6 and len(kept) == 24
    assert not held & trained  # no patient on both sides
    again, _ = hold_out(train, patients, 0.2, seed=0, index=0)
    assert torch.equal(again.x, kept.x)
    assert hold_out(train, patients, 0.0, seed=0, index=0)[1] is None
