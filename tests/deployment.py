"""A federation on loopback for the deployment tests: the CA, the hospitals' keys and
images, the configs of server/README.md and sites/README.md, and the real `fedmed server
start` and `fedmed site start` processes, each in its own process group so a test can
crash it and every process is stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedmed import config as config_mod
from fedmed.data.export import export_demo
from fedmed.deployment.certs import init_federation, site_keys

from .conftest import free_port

HOSPITALS = ("hospital-01", "hospital-02", "hospital-03")
IMAGES = ["data.image_size=32", "data.hospitals=3", "data.train_per_hospital=24", "data.test_per_hospital=8"]
FEDMED = str(Path(sys.executable).parent / "fedmed")


def make_world(root: Path, cache_dir: str) -> None:
    """Everything both sides prepare before a run (the READMEs' steps), once per module."""
    init_federation(root / "server/certs", ["localhost", "127.0.0.1"])
    (root / "server/enrolled").mkdir(parents=True)
    for name in (*HOSPITALS, "hospital-99"):
        _, public = site_keys(root / "sites/keys", name)
        if name != "hospital-99":  # never enrolled
            (root / "server/enrolled" / public.name).write_bytes(public.read_bytes())
    (root / "sites/keys/ca.crt").write_bytes((root / "server/certs/ca.crt").read_bytes())
    export_demo(config_mod.load(None, IMAGES, {"data.cache_dir": cache_dir}), root / "images")


class Federation:
    def __init__(self, root: Path, cache_dir: str, run: str) -> None:
        self.root, self.cache_dir, self.name = root, cache_dir, run
        self.port = free_port()
        self.state = f"server/state-{run}"
        self.ledgers = f"sites/ledgers-{run}"
        self.procs: dict[str, subprocess.Popen] = {}

    def server_config(self, **federation: object) -> Path:
        settings = {"rounds": 2, "round_timeout": 240, **federation}
        lines = ["[federation]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
                 "[data]", "image_size = 32", "global_test_size = 24", f"cache_dir = {json.dumps(self.cache_dir)}",
                 "[train]", "batch_size = 8", "[output]", f'dir = "runs-{self.name}"',
                 "[server]", f'address = "127.0.0.1:{self.port}"', f'state = "{self.state}"', 'enrolled = "server/enrolled"']
        path = self.root / f"{self.state}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def site_config(self, name: str, *policy: str) -> Path:
        data = "images/hospital-01" if name == "hospital-99" else f"images/{name}"
        lines = ["[data]", 'source = "disk"', f'path = "{data}"', "image_size = 32", f"cache_dir = {json.dumps(self.cache_dir)}",
                 "[site]", f'name = "{name}"', f'server = "127.0.0.1:{self.port}"', 'ca_cert = "sites/keys/ca.crt"',
                 f'ledger_dir = "{self.ledgers}"', *policy]
        path = self.root / f"{self.ledgers}-{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, label: str, *args: str) -> subprocess.Popen:
        log = (self.root / f"{label}.log").open("ab")
        proc = subprocess.Popen([FEDMED, *args], cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        self.procs[label] = proc
        return proc

    def start_server(self, config: Path, *extra: str, label: str = "server") -> subprocess.Popen:
        proc = self.start(label, "server", "start", "--config", str(config), *extra)
        self.wait_for(lambda: (self.root / self.state / "current.json").is_file(), 120, f"{label} to start its run", proc)
        return proc

    def start_sites(self, *sites: tuple[str, tuple[str, ...]]) -> None:
        for name, policy in sites:
            self.start(name, "site", "start", "--config", str(self.site_config(name, *policy)))

    def output(self, label: str) -> str:
        return (self.root / f"{label}.log").read_text(errors="replace")

    def run_dir(self) -> Path:
        return Path(json.loads((self.root / self.state / "current.json").read_text())["run_dir"])

    def rounds_done(self) -> list[dict]:
        path = self.run_dir() / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def wait_for(self, ready, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) while waiting for {what}:\n{self.output(self._label(proc))[-3000:]}")
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def finish(self, label: str = "server", timeout: float = 420) -> int:
        proc = self.procs[label]
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{label} did not finish in {timeout} s:\n{self.output(label)[-3000:]}") from None

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
