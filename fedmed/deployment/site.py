"""`fedmed site start`: a hospital's Flower SuperNode, pointed at the federation's server
over TLS with the node's enrolled key, running fedmed's ClientApp on the hospital's own
data under the hospital's own policy (its site config, which never leaves the machine)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import tomli_w
from rich.console import Console

from fedmed.config import FedmedConfig, unflatten
from fedmed.data.sites import ensure_data, site_data
from fedmed.deployment import checks
from fedmed.errors import FedmedError
from fedmed.federation import wire
from fedmed.federation.policy import hospital_config
from fedmed.run.directory import write_new

REFUSED = ("[code: 2004]", "Failed to activate SuperNode")  # what flower-supernode logs when refused
REJOIN_S, RETRY_S = 90.0, 10.0
WATCH_S = 1.0  # how often the node's log is read for refusals to show


def _key(cfg: FedmedConfig) -> Path:
    key = Path(cfg.site.key or f"sites/keys/{cfg.site.name}.key")
    if not key.is_file():
        raise FedmedError(f"this node's private key {key} does not exist (site.key): create it with `fedmed certs site {cfg.site.name}`")
    return key


def check(cfg: FedmedConfig, config_path: Path) -> tuple[str, int, Path, Path]:
    """Everything that can be wrong before the node starts: (host, port, CA, key)."""
    site = cfg.site
    if not site.name:
        raise FedmedError(f"{config_path} has no site.name: set the hospital's name as enrolled (e.g. hospital-02)")
    if cfg.data.source != "disk" or not cfg.data.path:
        raise FedmedError(f"{config_path} names no data: set data.source = \"disk\" and data.path to this hospital's images")
    if not site.server:
        raise FedmedError(f"{config_path} has no site.server: set the server's HOST:PORT from its operator")
    host, port = checks.parse_address(site.server, "site.server")
    ca = Path(site.ca_cert)
    checks.certificate(ca, "the federation's CA certificate", "ask the server's operator for ca.crt (site.ca_cert)")
    key = _key(cfg)
    if site.port:
        checks.port_free("127.0.0.1", site.port, "site.port (0 picks a free one)")
    checks.reachable_over_tls(host, port, ca, "site.server and site.ca_cert")
    return host, port, ca, key


def _refused(log: Path, start: int) -> bool:
    """Whether the SuperLink refused to activate the node since byte `start` of its log."""
    with log.open("rb") as handle:
        handle.seek(start)
        text = handle.read().decode("utf-8", errors="replace")
    return any(marker in text for marker in REFUSED)


def _snapshot(cfg: FedmedConfig, folder: Path) -> Path:
    """The settings this node runs with (after `--set`, paths made absolute), where the
    ClientApp reads them; mode 0600, as they name paths on this machine."""
    data = cfg.data.model_copy(update={"path": str(Path(cfg.data.path).expanduser().resolve())})
    path = folder / f"{cfg.site.name}.node.toml"
    path.unlink(missing_ok=True)
    write_new(path, tomli_w.dumps(unflatten(cfg.model_copy(update={"data": data}).flat())).encode(), 0o600)
    return path


def start(cfg: FedmedConfig, config_path: Path, console: Console) -> int:
    """Run the node until it is stopped (Ctrl-C) or the server refuses it."""
    host, port, ca, key = check(cfg, config_path)
    own = hospital_config(cfg, cfg)
    ensure_data(own, announce=console.print)
    data = site_data(own, 0)
    ledgers = Path(cfg.site.ledger_dir).expanduser().resolve()
    ledgers.mkdir(parents=True, exist_ok=True)
    log = ledgers / f"{cfg.site.name}-supernode.log"
    node_config = f"{wire.SITE_CONFIG}='{_snapshot(cfg, ledgers)}' {wire.LEDGER_DIR}='{ledgers}'"
    command = [
        "flower-supernode", "--superlink", f"{host}:{port}", "--root-certificates", str(ca.resolve()),
        "--auth-supernode-private-key", str(key.resolve()), "--port", str(cfg.site.port or checks.free_port()),
        "--node-config", node_config,
    ]
    console.print(
        f"{cfg.site.name}: starting the node against {host}:{port} with {len(data.train)} training and {len(data.test)} test images; "
        f"ledgers and log in {ledgers}. Only model updates and aggregate metrics leave this machine. Ctrl-C stops the node."
    )
    # The server refuses a key it has not enrolled, and also, for up to a minute, the key
    # of a node that vanished without saying goodbye (it still counts as connected).
    deadline = time.time() + REJOIN_S
    while True:
        offset = log.stat().st_size if log.exists() else 0
        code = _run_node(command, log, console)
        if code is None:
            console.print(f"{cfg.site.name}: node stopped")
            return 0
        if not _refused(log, offset):
            console.print(f"[red]{cfg.site.name}: the node stopped (exit {code}); see {log}[/red]")
            return 1
        if time.time() > deadline:
            raise FedmedError(
                f"the server refused this node: its key {key} is not enrolled there (or a node with this key is still "
                f"connected); send {key.with_suffix('.pub').name} to the server's operator"
            )
        console.print(f"{cfg.site.name}: the server does not accept this node's key yet; trying again in {RETRY_S:.0f} s")
        time.sleep(RETRY_S)


def _run_node(command: list[str], log: Path, console: Console) -> int | None:
    """The SuperNode until it exits (its exit code) or Ctrl-C (None). Meanwhile, what the
    server refuses this node for is shown here, not only in its log."""
    offset = log.stat().st_size if log.exists() else 0
    shown: set[str] = set()
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=checks.flower_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                code = proc.wait(timeout=WATCH_S)
                _show_refusals(log, offset, shown, console)  # what it logged in its last moments
                return code
            except subprocess.TimeoutExpired:
                offset = _show_refusals(log, offset, shown, console)
    except KeyboardInterrupt:
        checks.stop(proc)
        return None


def _show_refusals(log: Path, offset: int, shown: set[str], console: Console) -> int:
    """Print each new kind of refusal the node's ClientApp logged since byte `offset`; the new offset."""
    with log.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
    for line in complete.decode("utf-8", errors="replace").splitlines():
        line = line.strip().removeprefix("fedmed: ")
        if line.startswith(wire.NAME_MISMATCH) and line not in shown:
            shown.add(line)
            console.print(f"[red]the server refuses this node's replies: {line}[/red]")
    return offset + len(complete)
