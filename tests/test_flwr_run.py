"""`flwr run .` as the README has a user type it, with the venv activated: Flower starts
its own local SuperLink (flower-superlink, flower-superexec, flwr-simulation, Ray), here on
a free loopback port (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT) with its own FLWR_HOME, Ray
temp dir, key store and data cache, so nothing of the user's (~/.flwr, port 39091,
/tmp/ray) is touched; the SuperLink, detached by Flower, is stopped at the end.

Flower 1.41 facts relied on (installed source, flwr/...): the simulated federation has 2
SuperNodes unless `--federation-config` says otherwise (supercore/constant.py); the
SuperLink installs the app's dependencies for every run unless started with
FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1, which the venv's activate script sets
(Makefile); `flwr run` returns once the run has started, so its outcome is the run's
status (`flwr list --run-id ID --format json`); `flwr run` gives the SuperLink it starts
15 s to come up (cli/constant.py, LOCAL_SUPERLINK_STARTUP_TIMEOUT), a timer a loaded
machine can lose, and uses one already answering on its port (cli/local_superlink.py):
the fixture starts it with Flower's own command line, in the activated venv's
environment, and waits for its health endpoint.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]
ACTIVATE = Path(sys.executable).parent / "activate"
RUN_TIMEOUT = 300.0
STARTUP_TIMEOUT = 180.0  # a hang guard only: the SuperLink is waited for by its health endpoint
SMALL = "data.train_per_hospital=24 data.test_per_hospital=12 data.global_test_size=24 data.image_size=32 train.batch_size=8"


@dataclass
class LocalFlower:
    """A shell with the venv activated, and Flower's home, ports and Ray folder its own."""

    env: dict[str, str]
    home: Path
    port: int

    def flwr(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`flwr COMMAND` in bash, after `source .venv/bin/activate`."""
        return self._shell(f"flwr {command}", timeout)

    def _shell(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        script = f"source {shlex.quote(str(ACTIVATE))} && {command}"
        return subprocess.run(["bash", "-c", script], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def start_superlink(self) -> subprocess.Popen:
        """The local SuperLink `flwr run` would start (its command line: cli/local_superlink.py),
        in the venv's environment as `activate` leaves it, once its health endpoint answers."""
        runtime = self.home / "local-superlink"
        runtime.mkdir(parents=True)
        command = [
            "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}", "--host", "127.0.0.1", "--port", str(self.port),
            "--log-file", str(runtime / "superlink.log"), "--database", str(runtime / "state.db"),
        ]  # fmt: skip
        proc = subprocess.Popen(command, env=activated(self.env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _healthy(self.port):
            assert proc.poll() is None, f"the local SuperLink exited ({proc.returncode}): {(runtime / 'superlink.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the local SuperLink did not answer in {STARTUP_TIMEOUT:g} s (a hang)"
            time.sleep(0.2)
        return proc

    def run(self, command: str, out: Path) -> dict:
        """`flwr run . COMMAND` (its run directory under `out`), then its run's record once
        finished. Each `flwr` command costs a second or two of CPU: Flower is asked for the
        status once the run directory says it has finished, not every second."""
        started = self.flwr(f"run . {command} --format json")
        assert started.returncode == 0, started.stdout + started.stderr
        reply = json.loads(started.stdout[started.stdout.index("{") :])
        assert reply["success"], reply
        deadline = time.monotonic() + RUN_TIMEOUT
        # Until the run directory says finished, or the SuperLink logs that the run's task
        # ended (a run that failed, say Ray not starting on a loaded machine, then fails
        # below with Flower's status and reason, not after RUN_TIMEOUT).
        log = self.home / "local-superlink" / "superlink.log"
        while not any(json.loads(p.read_text()).get("state") == "finished" for p in out.glob("*/status.json")):
            if re.search(rf"Finished task \d+ of run {reply['run-id']}\b", log.read_text(errors="replace")):
                break
            assert time.monotonic() < deadline, f"run {reply['run-id']} wrote no finished status in {RUN_TIMEOUT:g} s"
            time.sleep(0.5)
        while True:  # the engine's own bookkeeping after the ServerApp returns
            listed = self.flwr(f"list --run-id {reply['run-id']} --format json")
            assert listed.returncode == 0, listed.stdout + listed.stderr
            (run,) = json.loads(listed.stdout)["runs"]
            if run["status"].startswith("finished") or time.monotonic() > deadline:
                return run
            time.sleep(2.0)


def activated(env: dict[str, str]) -> dict[str, str]:
    """`env` as `source .venv/bin/activate` leaves it: its exports (Makefile) included."""
    script = f"source {shlex.quote(str(ACTIVATE))} && env -0"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, check=True, timeout=60).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success
    except httpx.HTTPError:
        return False


def _stop(port: int, marks: list[str]) -> list[str]:
    """Stop the SuperLink Flower detached on `port` (its SuperExec and their children
    follow it); what is left of Flower's and Ray's processes naming `marks` 30 s later
    (Ray's actors wind down on their own after a run) is killed and returned."""
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in line and str(port) in line:
            tree = [proc, *proc.children(recursive=True)]
            proc.terminate()
            _, alive = psutil.wait_procs(tree, timeout=30)
            for straggler in alive:
                straggler.kill()
    _, alive = psutil.wait_procs(_marked(marks), timeout=30)
    left = []
    for proc in alive:
        try:
            left.append(" ".join(proc.cmdline())[:200])
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    return left


def _marked(marks: list[str]) -> list[psutil.Process]:
    """Flower's and Ray's processes that name one of `marks` (in their command line, or
    their FLWR_HOME or RAY_TMPDIR)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if any(word in line for word in ("flower-", "flwr-", "ray::", "raylet", "gcs_server")) and any(
                mark in line or mark in proc.environ().get("FLWR_HOME", "") + proc.environ().get("RAY_TMPDIR", "") for mark in marks
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def local_flower(tmp_path_factory, cache_dir) -> Iterator[LocalFlower]:
    tmp = tmp_path_factory.mktemp("flwr-run")
    ray_tmp = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp),
        "FLWR_HOME": str(tmp / "flwr-home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "local",  # never a `ray start` cluster of the user's
        "FEDMED_CACHE": cache_dir, "FEDMED_KEY_STORE": str(tmp / "keys"),
    }  # fmt: skip
    flower = LocalFlower(env, tmp / "flwr-home", port)
    try:
        flower.start_superlink()
        yield flower
    finally:
        left = _stop(port, [ray_tmp, str(tmp)])
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"processes left behind: {left}"


def test_the_readme_command_completes_a_run_and_installs_nothing(local_flower, tmp_path):
    """Flower's default federation (2 SuperNodes) serves 3 hospitals: a node plays whichever
    hospital a request names. (A federation without SuperNodes fails after
    simulation.node_timeout in one line: tests/test_federation.py, in-process.)"""
    run = local_flower.run(f'--run-config "federation.rounds=2 data.hospitals=3 {SMALL} output.dir=\'{tmp_path}\'"', tmp_path)
    assert run["status"] == "finished:completed", run
    (out,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["hospitals"]) for r in records] == [["hospital-01", "hospital-02", "hospital-03"]] * 2
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert not (local_flower.home / "runtime-envs").exists()  # nothing installed for the run
