"""`fedmed site start`: a hospital's Flower SuperNode, pointed at the federation's server
over TLS with the node's enrolled key, running fedmed's ClientApp on the hospital's own
data under the hospital's own policy (its site config, which never leaves the machine)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from rich.console import Console

from fedmed.config import FedmedConfig
from fedmed.data.sites import ensure_data, site_data
from fedmed.deployment import checks
from fedmed.deployment.policy import SITE_CONFIG, hospital_config
from fedmed.errors import FedmedError
from fedmed.audit.hospital_side import NODE_LEDGER_DIR

REFUSED = ("FLEET_NODE_ACTIVATION_FAILED", "2004", "not registered", "PERMISSION_DENIED", "Unauthenticated")


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


def _refused(log: Path) -> bool:
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    return any(marker in text for marker in REFUSED)


def start(cfg: FedmedConfig, config_path: Path, console: Console) -> int:
    """Run the node until it is stopped (Ctrl-C) or the server refuses it."""
    host, port, ca, key = check(cfg, config_path)
    own = hospital_config(cfg, cfg)
    ensure_data(own, announce=console.print)
    data = site_data(own, 0)
    ledgers = Path(cfg.site.ledger_dir).expanduser().resolve()
    ledgers.mkdir(parents=True, exist_ok=True)
    log = ledgers / f"{cfg.site.name}-supernode.log"
    node_config = f"{SITE_CONFIG}='{config_path.resolve()}' {NODE_LEDGER_DIR}='{ledgers}'"
    command = [
        "flower-supernode", "--superlink", f"{host}:{port}", "--root-certificates", str(ca.resolve()),
        "--auth-supernode-private-key", str(key.resolve()), "--port", str(cfg.site.port or checks.free_port()),
        "--node-config", node_config,
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=checks.flower_env(), stdout=out, stderr=subprocess.STDOUT)
    console.print(
        f"{cfg.site.name}: node started against {host}:{port} with {len(data.train)} training and {len(data.test)} test images; "
        f"ledgers and log in {ledgers}. Only model updates and aggregate metrics leave this machine. Ctrl-C stops the node."
    )
    try:
        while proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        console.print(f"{cfg.site.name}: node stopped")
        return 0
    if _refused(log):
        raise FedmedError(
            f"the server refused this node: its key {key} is not enrolled there; send {key.with_suffix('.pub').name} to the server's operator"
        )
    console.print(f"[red]{cfg.site.name}: the node stopped (exit {proc.returncode}); see {log}[/red]")
    return 1
