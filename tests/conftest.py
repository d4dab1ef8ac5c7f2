"""Shared fixtures: a tiny federation that trains in seconds, with its own data cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def ray_head_on_loopback() -> Iterator[tuple[str, subprocess.Popen]]:
    """A real Ray head on a free loopback port, as a user's cluster: yields its address and
    process; stopped and cleaned up on exit."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="fedmed-ray-", dir="/tmp")  # Ray's sockets need a short path
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    with (Path(temp_dir) / "head.log").open("w") as sink:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    try:
        wait_for_port(port, timeout=90, alive=head)
        yield f"127.0.0.1:{port}", head
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """One Ray head for the whole session: each simulation attaches to it
    (`simulation.ray_address`) instead of starting and stopping its own Ray, which saves
    about 10 s a simulation. The sweep and CLI tests still run fedmed's own Ray."""
    with ray_head_on_loopback() as (address, _):
        yield address


@pytest.fixture
def tiny_config(cache_dir, tmp_path, request):
    """3 hospitals, 32x32 images, 2 rounds; outputs under tmp_path/runs. Slow tests (the
    simulations) attach to the session's Ray head."""
    shared = [f"simulation.ray_address='{request.getfixturevalue('ray_head')}'"] if request.node.get_closest_marker("slow") else []

    def make(*extra: str) -> config_mod.FedmedConfig:
        return config_mod.load(None, [*TINY, *shared, *extra], {"data.cache_dir": cache_dir, "output.dir": str(tmp_path / "runs")})

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
