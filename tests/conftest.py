"""Shared fixtures: a tiny federation that trains in seconds, with its own data cache."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedmed import config as config_mod  # noqa: E402

TINY = [
    "data.image_size=32",
    "data.hospitals=3",
    "data.train_per_hospital=24",
    "data.test_per_hospital=12",
    "data.global_test_size=24",
    "federation.rounds=2",
    "train.batch_size=8",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fedmed-cache"))


@pytest.fixture
def tiny_config(cache_dir, tmp_path):
    """3 hospitals, 32x32 images, 2 rounds; outputs under tmp_path/runs."""

    def make(*extra: str) -> config_mod.FedmedConfig:
        return config_mod.load(None, [*TINY, *extra], {"data.cache_dir": cache_dir, "output.dir": str(tmp_path / "runs")})

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive=None) -> None:
    """Wait until something listens on the loopback port (and `alive`, a Popen, has not died)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the process meant to listen on {port} exited with code {alive.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
