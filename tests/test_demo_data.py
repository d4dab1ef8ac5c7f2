import numpy as np
from PIL import Image

from fedmed.data import demo
from fedmed.data.export import export_demo
from fedmed.data.phantom import CLASSES

SPEC = demo.DemoSpec(seed=5, image_size=32, hospitals=2, train_per_hospital=16, test_per_hospital=8, global_test_size=12)


def test_generator_is_deterministic_whatever_the_number_of_workers():
    a = demo.generate(SPEC, workers=1)
    b = demo.generate(SPEC, workers=2)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)


def test_other_seed_gives_other_images():
    a = demo.generate(SPEC, workers=1)
    b = demo.generate(demo.DemoSpec(**{**SPEC.__dict__, "seed": 6}), workers=1)
    assert not np.array_equal(a.images, b.images)


def test_every_split_of_every_hospital_is_class_balanced():
    data = demo.generate(SPEC, workers=1)
    for h in range(SPEC.hospitals):
        for split, n in (("train", 16), ("test", 8)):
            counts = np.bincount(data.select(split, h).labels, minlength=len(CLASSES))
            assert counts.tolist() == [n // len(CLASSES)] * len(CLASSES)
    assert np.bincount(data.select("global_test").labels).tolist() == [3, 3, 3, 3]


def test_images_are_not_blank_and_differ():
    data = demo.generate(SPEC, workers=1)
    imgs = data.images.astype(float)
    assert imgs.mean() > 20 and imgs.std() > 20
    assert len({img.tobytes() for img in data.images}) == len(data.images)


def test_cache_is_written_once_and_reused(tmp_path):
    path = demo.ensure_cached(SPEC, str(tmp_path))
    stamp = (path / "images.npy").stat().st_mtime_ns
    assert demo.ensure_cached(SPEC, str(tmp_path)) == path
    assert (path / "images.npy").stat().st_mtime_ns == stamp
    loaded = demo.load(SPEC, str(tmp_path))
    assert np.array_equal(np.asarray(loaded.images), demo.generate(SPEC, workers=1).images)


def test_make_demo_writes_the_kaggle_layout_and_a_contact_sheet(tiny_config, tmp_path):
    cfg = tiny_config("data.hospitals=2")
    out = tmp_path / "demo"
    sheet = export_demo(cfg, out)
    for hospital in ("hospital-01", "hospital-02"):
        for split, n in (("Training", 24), ("Testing", 12)):
            for name in CLASSES:
                files = list((out / hospital / split / name).glob("*.png"))
                assert len(files) == n // 4
    with Image.open(sheet) as img:
        assert img.size[0] > 4 * 32 and img.size[1] > 2 * 32
