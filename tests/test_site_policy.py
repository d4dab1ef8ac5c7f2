"""A real hospital's policy: what it declines, with a reason that names settings only."""

import pytest

from fedmed import config as config_mod
from fedmed.errors import FedmedError
from fedmed.federation import policy

ARCH = "ab" * 32


def site(*overrides: str):
    return config_mod.load(None, ["site.name=hospital-02", *overrides])


def federation(*overrides: str):
    return config_mod.load(None, list(overrides))


def test_no_policy_accepts_anything():
    assert policy.refusal(site(), federation(), 7, ARCH, None) is None


def test_rounds_beyond_max_rounds_are_declined():
    own = site("site.max_rounds=2")
    assert policy.refusal(own, federation(), 2, ARCH, None) is None
    assert "rounds 1-2 only" in policy.refusal(own, federation(), 3, ARCH, None)


def test_an_architecture_not_listed_is_declined():
    own = site(f"site.models='{'cd' * 32}, {ARCH}'")
    assert policy.refusal(own, federation(), 1, ARCH, None) is None
    assert "not one this hospital accepts" in policy.refusal(own, federation(), 1, "ef" * 32, None)


def test_a_privacy_policy_requires_secret_sample_level_dp_and_enough_noise():
    own = site("site.max_epsilon=4.0", "site.min_noise=1.0")
    assert "requires sample-level DP" in policy.refusal(own, federation(), 1, ARCH, None)
    dp = federation("privacy.mode=sample")
    assert policy.refusal(own, dp, 1, ARCH, 1.2) is None
    assert "below this hospital's minimum" in policy.refusal(own, dp, 1, ARCH, 0.8)
    assert "refuses privacy.reproducible" in policy.refusal(own, federation("privacy.mode=sample", "privacy.reproducible=true"), 1, ARCH, 1.2)


def test_the_hospital_trains_on_its_own_data_at_the_federations_image_size():
    own = site("data.source=disk", "data.path=/srv/mri", "data.image_size=128")
    with pytest.raises(FedmedError, match="128"):
        policy.hospital_config(federation(), own)
    merged = policy.hospital_config(federation("data.hospitals=5"), site("data.source=disk", "data.path=/srv/mri"))
    assert (merged.data.path, merged.data.hospitals) == ("/srv/mri", 1)
