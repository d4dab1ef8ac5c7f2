"""`fedmed server start` and `fedmed server status`: the coordinating centre's Flower
SuperLink (TLS, node authentication), its enrolled hospitals, and one federated run of
the ServerApp the simulation uses, watched until it finishes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmed.config import FedmedConfig, from_flat
from fedmed.deployment import checks
from fedmed.deployment.control import Control
from fedmed.errors import FedmedError
from fedmed.federation import checkpoint
from fedmed.ledger.keys import KeyStore
from fedmed.run.deployed import RUN_FILE, DeployedRun
from fedmed.run.directory import RunDirectory, atomic_write, resolve_run_name, run_path

CONNECTION = "fedmed"  # the SuperLink connection's name in the state folder's Flower home
SERVER_APP, CLIENT_APP = "fedmed.federation.server_app:app", "fedmed.federation.client_app:app"
CLIENT_APP_ENV = "FEDMED_CLIENTAPP"  # another installed ClientApp for the hospitals to run (a wrapper of fedmed's, in tests)
POLL_S = 3.0  # how often the operator's terminal looks for finished rounds and the run's status


class State:
    """The server's state folder: the SuperLink's database and log, the Flower home the
    `flwr` commands use, the app bundle's source, and the current run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.database, self.log = root / "superlink.db", root / "superlink.log"
        self.home, self.app = root / "flwr", root / "app"
        self.current, self.nodes = root / "current.json", root / "nodes.json"
        self.run_file = root / "serverapp.json"  # the ServerApp's settings (`DeployedRun`): never sent to a node
        self.keys = root / "keys"  # the server's ledger signing key and its runs' trust files (`KeyStore`)

    def read(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise FedmedError(f"cannot read {path} ({exc}): is server.state the folder the server ran with?") from None


def flwr_run(state: State, timeout: float = 120) -> str:
    """`flwr run` of the app bundle against this server's SuperLink; the new run's id."""
    command = ["flwr", "run", str(state.app), CONNECTION, "--format", "json"]
    try:
        done = subprocess.run(command, env=checks.flower_env(state.home), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FedmedError(f"`flwr run` got no answer in {timeout:.0f} s: is the SuperLink running? (log: {state.log})") from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise FedmedError(f"`flwr run` failed: {(done.stderr or done.stdout).strip()[-300:]}") from None
    if not answer.get("success", False):
        message = str(answer.get("error-message", "unknown error")).strip().splitlines()
        raise FedmedError(f"`flwr run` failed: {message[-1] if message else 'unknown error'}")
    return str(answer["run-id"])


def _enrolled(folder: Path) -> dict[str, Path]:
    keys = {p.stem: p for p in sorted(folder.glob("*.pub"))} if folder.is_dir() else {}
    if not keys:
        raise FedmedError(f"no enrolled hospitals: put each hospital's NAME.pub (from `fedmed certs site NAME`) in {folder} (server.enrolled)")
    return keys


def _dial(host: str) -> str:
    """Where this machine reaches a SuperLink listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _write_connection(state: State, host: str, port: int, ca_cert: Path) -> None:
    dial = _dial(host)
    state.home.mkdir(parents=True, exist_ok=True)
    atomic_write(
        state.home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{dial}:{port}"\nroot-certificates = "{ca_cert.resolve()}"\n',
    )


def _write_app(state: State, flat: dict[str, Any], resume_from: str, nodes: dict[str, str]) -> None:
    """The Flower app bundle: no code, only which installed ServerApp and ClientApp to run
    (hospitals run their own installed fedmed, never shipped code), and no run config:
    Flower gives that to every node. The run's settings go to the ServerApp in a file on
    this machine (`DeployedRun`), and to each node, in each request, only what it needs."""
    import tomli_w

    DeployedRun(flat, resume_from, {int(node): name for name, node in nodes.items()}, str(state.keys)).save(state.run_file)
    state.app.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedmed-federation", "version": "1.0.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedmed",
            "components": {"serverapp": SERVER_APP, "clientapp": os.environ.get(CLIENT_APP_ENV, CLIENT_APP)},
        }}},
    }
    atomic_write(state.app / "pyproject.toml", tomli_w.dumps(project))


def _launch(state: State, host: str, port: int, certs: tuple[Path, Path, Path]) -> subprocess.Popen:
    ca, crt, key = certs
    command = [
        "flower-superlink", "--host", host, "--port", str(port),
        "--ssl-ca-certfile", str(ca.resolve()), "--ssl-certfile", str(crt.resolve()), "--ssl-keyfile", str(key.resolve()),
        "--enable-supernode-auth", "--database", str(state.database), "--disable-runtime-dependency-installation",
    ]
    # Its own working directory: the ServerApp runs there, and finds nothing else there.
    env = {**checks.flower_env(state.home, superexec_poll=1.0), RUN_FILE: str(state.run_file)}  # inherited by the ServerApp's process
    with state.log.open("ab") as log:
        return subprocess.Popen(command, cwd=state.root, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(state: State, proc: subprocess.Popen, control: Control, timeout: float = 90) -> None:
    """Until the SuperLink answers its Control API."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            lines = state.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            raise FedmedError(f"the SuperLink stopped at start ({lines[-1] if lines else 'no output'}); its log: {state.log}")
        try:
            control.nodes()
            return
        except FedmedError:
            time.sleep(1)
    raise FedmedError(f"the SuperLink did not answer within {timeout:.0f} s; its log: {state.log}")


def _register(state: State, control: Control, enrolled: dict[str, Path], fresh: bool) -> dict[str, str]:
    """Node ids by hospital. The database keeps registrations from an earlier start; a
    key taken out of server.enrolled is unregistered, so that node can no longer join."""
    nodes = {} if fresh else state.read(state.nodes)
    for name in sorted(set(nodes) - set(enrolled)):
        control.unregister(nodes.pop(name))
    for name, key in enrolled.items():
        if name not in nodes:
            nodes[name] = control.register(key)
            atomic_write(state.nodes, json.dumps(nodes, indent=2, sort_keys=True) + "\n")  # each, as the database has it
    atomic_write(state.nodes, json.dumps(nodes, indent=2, sort_keys=True) + "\n")
    return nodes


def _round_line(record: dict[str, Any], rounds: int) -> str:
    trained = sum(1 for phases in record.get("hospitals", {}).values() if "train" in phases)
    line = f"round {record['round']}/{rounds}: global test accuracy {record['test']['accuracy']:.3f}, {trained} hospitals trained"
    for site, reason in record.get("declined_reasons", {}).items():
        line += f"; {site} declined: {reason}"
    if record.get("dropped"):
        line += f"; dropped out: {', '.join(record['dropped'])}"
    return line


def _watch(state: State, proc: subprocess.Popen, control: Control, run_id: str, run_dir: Path, shown: int, console: Console) -> bool:
    """Print each round after the first `shown` as it finishes; True when the run completed.

    Every POLL_S seconds: the rounds from the run directory, the run's status from the
    SuperLink (a run that failed is noticed within that)."""
    rounds = int(state.read(state.current)["config"]["federation.rounds"])
    out = RunDirectory(run_dir)
    misses = 0
    while True:
        time.sleep(POLL_S)
        if proc.poll() is not None:
            raise FedmedError(f"the SuperLink stopped (exit {proc.returncode}; log {state.log}): `fedmed server start --resume` continues the run")
        records = out.rounds()
        for record in records[shown:]:
            console.print(_round_line(record, rounds))
        shown = len(records)
        try:
            run = control.run(run_id)
            misses = 0
        except FedmedError:
            misses += 1  # a busy SuperLink may miss one answer
            if misses == 5:
                raise
            continue
        if run.finished:
            for record in out.rounds()[shown:]:  # written just before the run ended
                console.print(_round_line(record, rounds))
            if not run.completed:
                console.print(f"[red]the run {run.status.split(':')[-1]}[/red]: {run.details or 'no details'} (SuperLink log: {state.log})")
            return run.completed


def _run_config(cfg: FedmedConfig, state: State, enrolled: int, resume: bool) -> tuple[dict[str, Any], str]:
    """The run's flat settings and, resuming, the run directory to resume."""
    flat = cfg.flat()
    flat["data.hospitals"] = enrolled
    flat["output.dir"] = str(Path(cfg.output.dir).expanduser().resolve())
    fresh = from_flat(flat)  # validates min_hospitals against the enrolled hospitals
    if fresh.attack.active:
        raise FedmedError(f"attack.kind = {fresh.attack.kind} simulates hospitals that misbehave; a deployment's hospitals are real: remove the [attack] section")
    if not resume:
        return resolve_run_name(fresh).flat(), ""
    current = state.read(state.current)
    if not current:
        raise FedmedError(f"there is no run to resume in {state.root} (server.state): start one without --resume")
    saved = from_flat(current["config"])
    if saved.digest() != fresh.digest():
        raise FedmedError("the federation's settings (or its enrolled hospitals) changed since the run started: resume needs the same, or start a new run")
    run_dir = RunDirectory(Path(current["run_dir"]))
    if (run_dir / RunDirectory.SUMMARY).is_file():
        raise FedmedError(f"the run in {run_dir.path} has finished: nothing to resume")
    checkpoint.load(run_dir, KeyStore(state.keys))  # one clear line if no round finished, or signed by another key
    return current["config"], str(run_dir.path)


def start(cfg: FedmedConfig, resume: bool, console: Console) -> int:
    """Start the SuperLink, enrol, run (or resume) the federation, stop the SuperLink.
    Exit code: 0 completed, 1 the run failed, 130 interrupted."""
    host, port = checks.parse_address(cfg.server.address, "server.address")
    certs = checks.server_certificates(Path(cfg.server.certs))
    enrolled = _enrolled(Path(cfg.server.enrolled))
    state = State(Path(cfg.server.state).resolve())
    flat, resume_from = _run_config(cfg, state, len(enrolled), resume)
    run_dir = Path(resume_from) if resume_from else run_path(from_flat(flat))
    checks.port_free(host, port, "server.address")
    state.root.mkdir(parents=True, exist_ok=True)
    _write_connection(state, host, port, certs[0])
    console.print(f"fedmed server: SuperLink on {host}:{port} (TLS, node authentication); log {state.log}")
    fresh = not state.database.exists()
    proc = _launch(state, host, port, certs)
    control = Control(f"{_dial(host)}:{port}", certs[0], state.log)
    try:
        _wait_ready(state, proc, control)
        nodes = _register(state, control, enrolled, fresh)
        console.print(f"enrolled: {', '.join(f'{name} (node {nodes[name]})' for name in enrolled)}")
        _write_app(state, flat, resume_from, nodes)
        run_id = flwr_run(state)
        atomic_write(state.current, json.dumps({"run_id": run_id, "run_dir": str(run_dir), "config": flat}, indent=2, sort_keys=True) + "\n")
        done = checkpoint.load(RunDirectory(run_dir), KeyStore(state.keys)).round if resume_from else 0
        action = f"resuming {run_dir} after round {done}" if resume_from else f"run {run_id} -> {run_dir}"
        console.print(f"{action}: {flat['federation.rounds']} rounds, at least {flat['federation.min_hospitals'] or len(enrolled)} of {len(enrolled)} hospitals; waiting for them")
        completed = _watch(state, proc, control, run_id, run_dir, done, console)
        if completed:
            console.print(f"run finished: {run_dir}")
            for ledgers in RunDirectory(run_dir).ledger_runs():  # one: the run's
                trust = KeyStore(state.keys).trust_file(ledgers.name)
                console.print(f"ledger keys: {trust}; give it to auditors apart from the run (`fedmed audit ... --keys {trust}`)")
        return 0 if completed else 1
    except KeyboardInterrupt:
        console.print(f"stopped; `fedmed server start --config ... --resume` continues after the last finished round ({run_dir})")
        return 130
    finally:
        control.close()
        checks.stop(proc)


def status(cfg: FedmedConfig, console: Console) -> int:
    """Connected hospitals and the current run's progress, from another terminal."""
    from rich.table import Table

    state = State(Path(cfg.server.state).resolve())
    current = state.read(state.current)
    if not current:
        raise FedmedError(f"no run has been started from {state.root} (server.state)")
    names = {node: name for name, node in state.read(state.nodes).items()}
    host, port = checks.parse_address(cfg.server.address, "server.address")
    try:
        with Control(f"{_dial(host)}:{port}", Path(cfg.server.certs) / "ca.crt", state.log, timeout=10) as control:
            nodes, run_status = control.nodes(), control.run(current["run_id"]).status
    except FedmedError:
        nodes, run_status = [], "server not running"
    if nodes:
        table = Table("hospital", "node", "status")
        for node in nodes:
            table.add_row(names.get(node.node_id, "(not enrolled here)"), node.node_id, node.status)
        console.print(table)
    records = RunDirectory(Path(current["run_dir"])).rounds()
    rounds = int(current["config"]["federation.rounds"])
    console.print(f"run {current['run_id']}: {run_status}; {len(records)} of {rounds} rounds done ({current['run_dir']})")
    if records:
        console.print(_round_line(records[-1], rounds))
    return 0
