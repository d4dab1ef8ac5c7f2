"""Bad input: one clear line on stderr, exit code 2, no traceback. The commands run in
this process through fedmed's entry point; one test runs `fedmed` as its own process."""

import re

import pytest

from .conftest import assert_clean_failure, fedmed, fedmed_process, free_port


def test_the_installed_command_reports_bad_input_in_one_line_and_shows_its_help():
    assert_clean_failure(fedmed_process("simulate", "--set", "federation.rounds=-2"), "`federation.rounds`", "greater than or equal to 1")
    result = fedmed_process("--help")
    assert result.returncode == 0 and "simulate" in result.stdout and "audit" in result.stdout


def test_missing_config_file(tmp_path):
    assert_clean_failure(fedmed("simulate", tmp_path / "missing.toml"), "config file not found", "missing.toml")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nroundz = 3\n")
    assert_clean_failure(fedmed("simulate", cfg), "unknown config key `federation.roundz`")


def test_wrong_value_type(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[federation]\nrounds = "ten"\n')
    assert_clean_failure(fedmed("simulate", cfg), "`federation.rounds`", "valid integer")


def test_unreachable_ray_address(tmp_path):
    port = free_port()  # nothing listens there
    result = fedmed("simulate", "--ray-address", f"127.0.0.1:{port}", "--out", tmp_path)
    assert_clean_failure(result, f"cannot reach a Ray cluster at 127.0.0.1:{port}")
    assert not any(tmp_path.iterdir()), "nothing is written before the input is known to be good"


def test_existing_run_directory_is_never_overwritten(tmp_path, cache_dir):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("seed = 1\n")
    result = fedmed("simulate", "--set", "federation.mode='pooled'", "--set", "output.name='mine'", "--out", tmp_path / "runs",
                    "--set", f"data.cache_dir={cache_dir!r}", "--set", "data.hospitals=1", "--set", "data.image_size=32")
    assert_clean_failure(result, "already holds a run")
    assert (run / "config.toml").read_text() == "seed = 1\n"


@pytest.mark.parametrize(
    ("args", "text"),
    [(["--help"], "simulate"), (["simulate", "--help"], "--ray-address"), (["data", "make-demo", "--help"], "Kaggle layout")],
)
def test_help_describes_the_commands(args, text):
    result = fedmed(*args)
    assert result.returncode == 0 and text in result.stdout


def test_data_check_reports_a_usable_dataset_and_names_skipped_files_locally(tmp_path):
    from tests import mri_fixtures as fx

    root = tmp_path / "kaggle"
    fx.image_folder(root, dict.fromkeys(fx.KAGGLE, 4), split="Training", suffix=".jpg")
    fx.image_folder(root, dict.fromkeys(fx.KAGGLE, 2), seed=1, split="Testing", suffix=".jpg")
    (root / "Training" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = fedmed("data", "check", root, "--set", "data.hospitals=2", "--set", f"data.cache_dir='{tmp_path / 'cache'}'")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    for needle in ("format imagefolder", "no_tumour", "broken.jpg", "usable: 24 images", "exact duplicates: 0"):
        assert needle in out
    assert fedmed("data", "check", root, "--strict", "--set", f"data.cache_dir='{tmp_path / 'cache'}'").returncode == 2


def test_data_check_on_an_unusable_dataset_is_one_line(tmp_path):
    (tmp_path / "d" / "glioma").mkdir(parents=True)
    (tmp_path / "d" / "glioma" / "notes.txt").write_text("x")
    assert_clean_failure(fedmed("data", "check", tmp_path / "d"), "no images found")
    assert_clean_failure(fedmed("data", "check", tmp_path / "missing"), "data.path does not exist")
    assert_clean_failure(fedmed("data", "check", tmp_path / "d", "--format", "tiff"), "data.format")


def test_simulate_on_disk_needs_a_path():
    assert_clean_failure(fedmed("simulate", "--set", "data.source=disk"), "data.path")


def test_data_check_refuses_data_too_small_for_the_hospitals(tmp_path):
    from tests import mri_fixtures as fx

    fx.image_folder(tmp_path / "d", {"glioma": 3, "pituitary": 3})
    args = ("data", "check", tmp_path / "d", "--set", f"data.cache_dir='{tmp_path / 'cache'}'")
    result = fedmed(*args, "--set", "data.hospitals=8")
    assert result.returncode == 2 and "would get no" in result.stderr, result.stderr
    largest = int(re.search(r"lower data.hospitals to (\d+) or fewer", result.stderr).group(1))  # the largest number that works
    assert fedmed(*args, "--set", f"data.hospitals={largest}").returncode == 0
    assert fedmed(*args, "--set", f"data.hospitals={largest + 1}").returncode == 2


@pytest.mark.parametrize(
    ("base", "setting", "needle"),
    [
        ("skew.labels=classes", "skew.beta=0", "`skew.beta`"),
        ("skew.labels=classes", "skew.quantity_beta=-1", "`skew.quantity_beta`"),
        ("skew.labels=classes", "skew.classes_per_hospital=5", "only 4 classes"),
        ("skew.labels=classes", "data.test_fraction=1.5", "`data.test_fraction`"),
        ("privacy.mode=sample", "privacy.epsilon=0", "`privacy.epsilon`"),
        ("privacy.mode=sample", "privacy.delta=-0.1", "`privacy.delta`"),
        ("privacy.mode=sample", "privacy.max_grad_norm=0", "`privacy.max_grad_norm`"),
        ("privacy.mode=sample", "model.norm=batch", "set model.norm = group"),
    ],
)
def test_impossible_skew_and_privacy_settings_are_one_line(tmp_path, base, setting, needle):
    assert_clean_failure(fedmed("simulate", "--set", base, "--set", setting, "--out", tmp_path), needle)
    assert not any(tmp_path.iterdir())


def test_more_hospitals_than_images_is_one_line(tmp_path):
    from tests import mri_fixtures as fx

    fx.image_folder(tmp_path / "d", {"glioma": 3, "pituitary": 3})
    result = fedmed("simulate", "--set", "data.source=disk", "--set", f"data.path='{tmp_path / 'd'}'", "--set", "data.hospitals=20",
                    "--set", f"data.cache_dir='{tmp_path / 'cache'}'", "--set", "skew.labels=dirichlet", "--out", tmp_path / "runs")
    assert_clean_failure(result, "cannot give 20 hospitals")


def test_an_annotated_class_that_does_not_exist_is_one_line():
    assert_clean_failure(fedmed("simulate", "--set", "labels.scenario=subset", "--set", "labels.annotated=astrocytoma"), "labels.annotated names astrocytoma")


def test_a_class_map_entry_that_is_not_folder_class_is_one_line(tmp_path):
    result = fedmed("data", "check", tmp_path, "--set", "data.class_map='tumor'")
    assert_clean_failure(result, "data.class_map entry 'tumor' must be `folder:class`")


def test_a_delta_not_below_one_over_n_is_one_line(tmp_path):
    from tests import mri_fixtures as fx

    fx.image_folder(tmp_path / "d", {"glioma": 6, "pituitary": 6})
    result = fedmed("simulate", "--set", "data.source=disk", "--set", f"data.path='{tmp_path / 'd'}'", "--set", "data.hospitals=1",
                    "--set", f"data.cache_dir='{tmp_path / 'cache'}'", "--set", "privacy.mode=sample", "--set", "privacy.delta=0.5", "--out", tmp_path / "runs")
    assert_clean_failure(result, "privacy.delta = 0.5 is not below 1/n")
    assert not (tmp_path / "runs").exists()
