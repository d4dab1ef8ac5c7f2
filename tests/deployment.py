"""A federation on loopback for the deployment tests: the CA, the hospitals' keys and
images, the configs of server/README.md and sites/README.md, and the real `fedmed server
start` and `fedmed site start` processes, each in its own process group so a test can
crash it and every process is stopped at the end.

Every wait is for an event (a file, a log line, a process exit); the deadlines only turn
a hang into a failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedmed import config as config_mod
from fedmed.data.export import export_demo
from fedmed.deployment.certs import init_federation, site_keys

from .conftest import free_port

HOSPITALS = ("hospital-01", "hospital-02", "hospital-03")
IMAGES = ["data.image_size=32", "data.hospitals=3", "data.train_per_hospital=24", "data.test_per_hospital=8"]
FEDMED = str(Path(sys.executable).parent / "fedmed")
DATA = {"hospital-04": "hospital-02", "hospital-99": "hospital-01"}  # hospitals that borrow another's images
# A dozen Flower processes share the test machine's cores: one thread each, so that no
# process spins waiting for threads the others hold (a real node keeps all its threads).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_world(root: Path, cache_dir: str) -> None:
    """Everything both sides prepare before a run (the READMEs' steps), once per module:
    `server/enrolled` holds hospital-01..03, `server/enrolled-4` hospital-01..04,
    `server/enrolled-2` hospital-01..02; hospital-99's key is enrolled nowhere."""
    init_federation(root / "server/certs", ["localhost", "127.0.0.1"])
    folders = {"enrolled": HOSPITALS, "enrolled-4": (*HOSPITALS, "hospital-04"), "enrolled-2": HOSPITALS[:2]}
    for folder in folders:
        (root / "server" / folder).mkdir(parents=True)
    for name in (*HOSPITALS, "hospital-04", "hospital-99"):
        _, public = site_keys(root / "sites/keys", name)
        for folder, names in folders.items():
            if name in names:
                (root / "server" / folder / public.name).write_bytes(public.read_bytes())
    (root / "sites/keys/ca.crt").write_bytes((root / "server/certs/ca.crt").read_bytes())
    export_demo(config_mod.load(None, IMAGES, {"data.cache_dir": cache_dir}), root / "images")


class Federation:
    def __init__(self, root: Path, cache_dir: str, run: str) -> None:
        self.root, self.cache_dir, self.name = root, cache_dir, run
        self.port = free_port()
        self.state = f"server/state-{run}"
        self.ledgers = f"sites/ledgers-{run}"
        self.procs: dict[str, subprocess.Popen] = {}

    def server_config(self, enrolled: str = "server/enrolled", privacy: dict[str, object] | None = None, **federation: object) -> Path:
        settings = {"rounds": 2, "round_timeout": 300, **federation}
        lines = ["[federation]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
                 "[privacy]", *(f"{k} = {json.dumps(v)}" for k, v in (privacy or {}).items()),
                 # the server's own test set: tiny demo data, generated once per number of hospitals
                 "[data]", "image_size = 32", "train_per_hospital = 8", "test_per_hospital = 4", "global_test_size = 24",
                 f"cache_dir = {json.dumps(self.cache_dir)}",
                 "[train]", "batch_size = 8", "[output]", f'dir = "runs-{self.name}"',
                 "[server]", f'address = "127.0.0.1:{self.port}"', f'state = "{self.state}"', f'enrolled = "{enrolled}"']
        path = self.root / f"{self.state}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def site_config(self, name: str, *policy: str, key: str = "", ledgers: str = "") -> Path:
        """`key`: a node key other than the name's; `ledgers`: a ledger folder other than the federation's."""
        lines = ["[data]", 'source = "disk"', f'path = "images/{DATA.get(name, name)}"', "image_size = 32", f"cache_dir = {json.dumps(self.cache_dir)}",
                 "[site]", f'name = "{name}"', f'server = "127.0.0.1:{self.port}"', 'ca_cert = "sites/keys/ca.crt"',
                 f'ledger_dir = "{ledgers or self.ledgers}"', *([f'key = "{key}"'] if key else []), *policy]
        path = self.root / f"{ledgers or self.ledgers}-{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, label: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.root / f"{self.name}-{label}.log").open("ab")
        proc = subprocess.Popen([FEDMED, *args], cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **ONE_THREAD, **(env or {})})
        self.procs[label] = proc
        return proc

    def start_server(self, config: Path, *extra: str, label: str = "server", env: dict[str, str] | None = None) -> subprocess.Popen:
        """`fedmed server start`, once it has started its run (a new `current.json`)."""
        before = self.current()
        proc = self.start(label, "server", "start", "--config", str(config), *extra, env=env)
        self.wait_for(lambda: self.current() not in ({}, before), f"{label} to start its run", proc)
        return proc

    def start_site(self, name: str, *policy: str, label: str | None = None, key: str = "", ledgers: str = "", env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.start(label or name, "site", "start", "--config", str(self.site_config(name, *policy, key=key, ledgers=ledgers)), env=env)

    def output(self, label: str) -> str:
        return (self.root / f"{self.name}-{label}.log").read_text(errors="replace")

    def node_log(self, name: str, ledgers: str = "") -> str:
        path = self.root / (ledgers or self.ledgers) / f"{name}-supernode.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def current(self) -> dict:
        path = self.root / self.state / "current.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def run_dir(self) -> Path:
        return Path(self.current()["run_dir"])

    def rounds_done(self) -> list[dict]:
        from fedmed.run.directory import RunDirectory

        return RunDirectory(self.run_dir()).rounds() if self.current() else []

    def wait_for(self, ready: Callable[[], bool], what: str, proc: subprocess.Popen | None = None, limit: float = 900) -> None:
        """Until `ready()`; fails if `proc` exits first. `limit` only turns a hang into a failure."""
        deadline = time.monotonic() + limit
        while not ready():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) while waiting for {what}:\n{self.output(self._label(proc))[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no sign of {what} after {limit:.0f} s (a hang)")
            time.sleep(0.5)

    def finish(self, label: str = "server", limit: float = 900) -> int:
        """The process's exit code, once it exits."""
        try:
            return self.procs[label].wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{label} did not exit in {limit:.0f} s (a hang):\n{self.output(label)[-3000:]}") from None

    def crash(self, label: str) -> None:
        """SIGKILL the whole process group: the machine losing power, as far as it can tell."""
        proc = self.procs[label]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        """Every process group, even one whose leader has exited (its children may not have)."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def _label(self, proc: subprocess.Popen) -> str:
        return next(label for label, p in self.procs.items() if p is proc)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
