"""Shared fixtures: a tiny federation that trains in seconds, with its own data cache;
one Ray head for the session; the command line run in this process."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Simulations sign with keys in the user's key store: the tests' own, never the user's.
os.environ["FEDMED_KEY_STORE"] = tempfile.mkdtemp(prefix="fedmed-test-keys-")

from fedmed import config as config_mod

atexit.register(shutil.rmtree, os.environ["FEDMED_KEY_STORE"], True)

TINY = [
    "data.image_size=32",
    "data.hospitals=3",
    "data.train_per_hospital=24",
    "data.test_per_hospital=12",
    "data.global_test_size=24",
    "federation.rounds=2",
    "train.batch_size=8",
]


# Test files that must share one worker under `pytest -n 2`: the Ray tests share the
# session's Ray head and DP run; the deployment tests' federations are one module fixture.
WORKER_GROUPS = {
    "test_deployment.py": "deployment",
    "test_simulation.py": "ray",
    "test_privacy_simulation.py": "ray",
    "test_audit.py": "ray",
    "test_interrupt.py": "ray",  # its resumed runs attach to the session's Ray head
    "test_sweep.py": "sweep",  # one study, read and changed by its tests in turn
    "test_flwr_run.py": "ray",  # Flower's own local SuperLink and Ray, beside the deployment tests' worker
}


# The groups in the order they are handed out, the longest first: the deployment and Ray
# tests start at once, one on each worker; the short tests fill in.
GROUP_ORDER = ("deployment", "ray", "sweep")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        group = WORKER_GROUPS.get(item.path.name)
        return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.hookimpl(optionalhook=True)  # without xdist (`-p no:xdist`) there is no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scope scheduling, the scopes being WORKER_GROUPS and otherwise single
    tests, handed out in collection order (GROUP_ORDER first), not by their number of
    tests. (xdist 3.8's own `--dist loadgroup` marks no longer group under pytest 9.2.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return WORKER_GROUPS.get(Path(nodeid.split("::")[0]).name, nodeid)

    return Grouped(config, log)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fedmed-cache"))


@dataclass(frozen=True)
class RayHead:
    address: str
    process: subprocess.Popen


@contextlib.contextmanager
def ray_head_on_loopback() -> Iterator[RayHead]:
    """A real Ray head on a free loopback port, as a user's cluster; stopped and cleaned
    up on exit."""
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
        yield RayHead(f"127.0.0.1:{port}", head)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One Ray head for the session, as a user's cluster: every Ray simulation attaches to
    it (`simulation.ray_address`) instead of starting and stopping its own."""
    with ray_head_on_loopback() as head:
        yield head


@pytest.fixture
def tiny_config(cache_dir, tmp_path):
    """3 hospitals, 32x32 images, 2 rounds; outputs under tmp_path/runs."""

    def make(*extra: str) -> config_mod.FedmedConfig:
        return config_mod.load(None, [*TINY, *extra], {"data.cache_dir": cache_dir, "output.dir": str(tmp_path / "runs")})

    return make


@pytest.fixture
def ray_config(tiny_config, ray_head):
    """A tiny config whose simulation runs on the session's Ray head."""

    def make(*extra: str) -> config_mod.FedmedConfig:
        return tiny_config(f"simulation.ray_address='{ray_head.address}'", *extra)

    return make


@pytest.fixture(scope="session")
def dp_run(cache_dir, ray_head, tmp_path_factory) -> Path:
    """One real Ray simulation with DP-SGD that several tests read: 3 hospitals, 3 rounds
    at epsilon 6 (PRV accountant); hospital-02's budget allows one round only, so it
    declines round 2 and the others go on."""
    from fedmed.federation.simulation import run_simulation
    from fedmed.privacy.accounting import StepHistory
    from fedmed.privacy.dpsgd import plan

    settings = [*TINY, f"simulation.ray_address='{ray_head.address}'", "privacy.mode=sample", "privacy.epsilon=6", "federation.rounds=3"]
    values = {"data.cache_dir": cache_dir, "output.dir": str(tmp_path_factory.mktemp("dp-run"))}
    cfg = config_mod.load(None, settings, values)
    p = plan(cfg, cfg.data.train_per_hospital)
    one, two = (StepHistory(p.accountant, [(p.sigma, p.rate, k * p.steps_per_round)]).epsilon(p.delta) for k in (1, 2))
    return run_simulation(config_mod.load(None, [*settings, f'privacy.budgets="hospital-02={(one + two) / 2:.3f}"'], values))


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def fedmed(*args: object, cwd: Path | None = None) -> Result:
    """`fedmed ARGS`, run in this process through the command's own entry point
    (`fedmed.cli.main`), its output captured. Not from threads: it changes directory."""
    from fedmed.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["fedmed", *map(str, args)]
    try:
        with contextlib.chdir(cwd or Path.cwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)  # `server start` and `site start` take SIGTERM over
    return Result(code, out.getvalue(), err.getvalue())


def fedmed_process(*args: object, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`fedmed ARGS` as its own process, as a user types it."""
    return subprocess.run([str(Path(sys.executable).parent / "fedmed"), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def from_a_terminal() -> None:
    """A `preexec_fn` for a command the test will Ctrl-C: SIGINT as a terminal leaves it.
    A suite started in the background (`make test &`, some CI runners) inherits SIGINT
    ignored, and a command keeps a signal it was started ignoring ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_clean_failure(result: Result | subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive: subprocess.Popen | None = None) -> None:
    """Wait until something listens on the loopback port (and `alive` has not died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the process meant to listen on {port} exited with code {alive.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
