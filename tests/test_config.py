import tomllib
from pathlib import Path

import pytest

from fedmed import config as config_mod
from fedmed.errors import FedmedError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_lists_every_setting_with_its_default():
    from fedmed.reference import with_flower_table

    text = (ROOT / "pyproject.toml").read_text()
    assert tomllib.loads(text)["tool"]["flwr"]["app"]["config"] == config_mod.FedmedConfig().flat()
    assert with_flower_table(text) == text, "pyproject.toml's Flower run config is stale: run `make reference`"


def test_quickstart_is_the_default_config():
    assert config_mod.load(ROOT / "simulations" / "quickstart.toml") == config_mod.FedmedConfig()


def test_overrides_are_parsed_as_toml_values():
    cfg = config_mod.load(None, ["federation.rounds=3", "train.lr=0.01", "model.name=resnet18", "output.save_model=false"])
    assert (cfg.federation.rounds, cfg.train.lr, cfg.model.name, cfg.output.save_model) == (3, 0.01, "resnet18", False)


def test_config_digest_ignores_where_outputs_go():
    a = config_mod.load(None, [], {"output.dir": "/tmp/x", "output.name": "a", "data.cache_dir": "/c"})
    b = config_mod.load(None, [], {"output.dir": "/tmp/y", "output.name": "b"})
    assert a.digest() == b.digest()
    assert a.digest() != config_mod.load(None, ["train.lr=0.01"]).digest()


def test_flat_round_trip():
    cfg = config_mod.load(None, ["federation.rounds=7", "seed=3"])
    assert config_mod.from_flat(cfg.flat()) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("federation.roundz=3", "unknown config key `federation.roundz`"),
        ("federation.rounds='ten'", "`federation.rounds`: Input should be a valid integer"),
        ("federation.rounds=-1", "`federation.rounds`: Input should be greater than or equal to 1"),
        ("train.lr=0", "`train.lr`: Input should be greater than 0"),
        ("data.image_size=512", "`data.image_size`"),
        ("nosection=1", "unknown config key `nosection`"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(FedmedError, match=None) as err:
        config_mod.load(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FedmedError, match="config file not found"):
        config_mod.load(tmp_path / "nope.toml")


def test_invalid_toml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 3\n")
    with pytest.raises(FedmedError, match="not valid TOML"):
        config_mod.load(bad)


def test_the_config_reference_documents_every_setting_with_its_default():
    from fedmed.reference import config_markdown

    page = (ROOT / "docs" / "config.md").read_text()
    assert page == config_markdown(), "docs/config.md is stale: run `make reference`"
    for key, default, _ in config_mod.reference():
        assert f"| `{key}` | `{default}` |" in page, key


def test_list_settings_are_typed_once_and_written_back_for_flower():
    cfg = config_mod.load(None, ['privacy.budgets="hospital-02=2.0, hospital-05=4"', 'site.models="ab, cd"', "labels.annotated=['glioma', 'pituitary']"])
    assert cfg.privacy.budgets == (("hospital-02", 2.0), ("hospital-05", 4.0))
    assert cfg.privacy.budget_for("hospital-05") == 4.0 and cfg.privacy.budget_for("hospital-01") == cfg.privacy.budget
    assert cfg.site.models == ("ab", "cd") and cfg.labels.annotated == ("glioma", "pituitary")
    assert cfg.data.num_classes == 4
    flat = cfg.flat()
    assert (flat["privacy.budgets"], flat["site.models"], flat["labels.annotated"]) == ("hospital-02=2.0,hospital-05=4.0", "ab,cd", "glioma,pituitary")
    assert config_mod.from_flat(flat) == cfg


def test_timestamped_run_names_never_reuse_a_directory(tmp_path):
    from fedmed.run.directory import resolve_run_name, run_path

    cfg = config_mod.load(None, [], {"output.dir": str(tmp_path)})
    first = resolve_run_name(cfg)
    run_path(first).mkdir()
    second = resolve_run_name(cfg)
    assert second.output.name != first.output.name and not run_path(second).exists()


def test_site_configs_use_the_one_schema_and_load_their_data(tmp_path):
    from fedmed.data.sites import site_data
    from tests import mri_fixtures as fx

    fx.image_folder(tmp_path / "site", dict.fromkeys(fx.KAGGLE, 5))
    sites = sorted((ROOT / "sites").glob("*.toml"))
    assert sites
    for path in sites:
        cfg = config_mod.load(path, [f"data.path='{tmp_path / 'site'}'", f"data.cache_dir='{tmp_path / 'cache'}'", "data.image_size=32"])
        assert cfg.data.source == "disk"
        hospital = site_data(cfg, 0)
        assert len(hospital.train) + len(hospital.test) == 20


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_study_config_is_valid(path):
    from fedmed.sweep import cells, load_study

    if "[sweep]" in path.read_text():
        _, spec = load_study(path)  # validates every cell's config
        assert len(cells(spec)) > 1
        with pytest.raises(FedmedError, match="is a study"):
            config_mod.load(path)
    else:
        config_mod.load(path)


@pytest.mark.parametrize("setting", ["privacy.epsilon=inf", "privacy.epsilon=nan", "train.lr=inf", "federation.round_timeout=inf"])
def test_a_setting_that_is_not_a_finite_number_is_refused(setting):
    """privacy.epsilon = inf would calibrate DP-SGD to no noise at all."""
    with pytest.raises(FedmedError, match="finite number"):
        config_mod.load(None, [setting])
