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


def test_the_cache_holds_the_global_test_set_written_once(tmp_path):
    path = demo.ensure_cached(SPEC, str(tmp_path))
    stamp = (path / demo.GLOBAL_TEST).stat().st_mtime_ns
    assert demo.ensure_cached(SPEC, str(tmp_path)) == path
    assert (path / demo.GLOBAL_TEST).stat().st_mtime_ns == stamp
    whole = demo.generate(SPEC, workers=1)
    assert np.array_equal(demo.global_test(SPEC, str(tmp_path)).images, whole.select("global_test").images)
    assert not (path / "hospitals").exists()  # no hospital made before it is asked


def test_a_hospital_is_made_when_first_asked_and_then_read_from_the_cache(tmp_path):
    whole = demo.generate(SPEC, workers=1)
    train, test = demo.hospital(SPEC, str(tmp_path), 1)
    assert np.array_equal(train.images, whole.select("train", 1).images) and np.array_equal(test.labels, whole.select("test", 1).labels)
    cached = demo.cache_path(SPEC, str(tmp_path)) / "hospitals"
    assert [p.name for p in cached.iterdir()] == ["00001.npz"]  # hospital 0 never asked: never made
    stamp = (cached / "00001.npz").stat().st_mtime_ns
    again, _ = demo.hospital(SPEC, str(tmp_path), 1)
    assert np.array_equal(again.images, train.images) and (cached / "00001.npz").stat().st_mtime_ns == stamp


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
