"""Checks run before starting a Flower process, so that a wrong path, an expired or
foreign certificate, a busy port or an unreachable server is one clear line (exit 2)
instead of a Flower process retrying forever; and starting and stopping those processes."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fedmed.errors import FedmedError


def parse_address(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedmedError(f"{key} = {text!r} is not HOST:PORT (e.g. fl.example.org:9093)")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int, key: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FedmedError(f"port {port} on {host} is not free ({exc.strerror}): stop what uses it or choose another {key}") from None


def certificate(path: Path, what: str, fix: str) -> x509.Certificate:
    """A PEM certificate that exists and is valid now."""
    if not path.is_file():
        raise FedmedError(f"{what} {path} does not exist: {fix}")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FedmedError(f"{what} {path} is not a PEM certificate ({exc}): {fix}") from None
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise FedmedError(f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: {fix}")
    if cert.not_valid_before_utc > now:
        raise FedmedError(f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    return cert


def server_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key): present, current, the server's signed by the CA
    and matching its key."""
    fix = f"create them with `fedmed certs init --host HOST --out {folder}`"
    ca = certificate(folder / "ca.crt", "the CA certificate", fix)
    server = certificate(folder / "server.crt", "the server certificate", fix)
    try:
        server.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise FedmedError(f"{folder / 'server.crt'} is not signed by {folder / 'ca.crt'} ({type(exc).__name__}): {fix}") from None
    key_path = folder / "server.key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise FedmedError(f"cannot read the server key {key_path} ({getattr(exc, 'strerror', None) or exc}): {fix}") from None
    if key.public_key().public_numbers() != server.public_key().public_numbers():
        raise FedmedError(f"{key_path} is not the key of {folder / 'server.crt'}: {fix}")
    return folder / "ca.crt", folder / "server.crt", key_path


def reachable_over_tls(host: str, port: int, ca_cert: Path, key: str, timeout: float = 10.0) -> None:
    """The server answers, and proves it holds a certificate from the federation's CA."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        raise FedmedError(
            f"the server at {host}:{port} is not the federation's ({exc.verify_message}): check {key} and ask the operator for ca.crt again"
        ) from None
    except ssl.SSLError as exc:
        raise FedmedError(f"the server at {host}:{port} does not speak TLS ({exc.reason}): check {key}") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FedmedError(
            f"cannot reach the server at {host}:{port} ({reason}): check {key}, that the server is started, and the firewall"
        ) from None


SUPEREXEC_POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # seconds, 0.01-60 (flwr 1.41)


def flower_env(flwr_home: Path | None = None, superexec_poll: float = 0.25) -> dict[str, str]:
    """Flower's commands from this environment, telemetry off, and their own home.

    `superexec_poll`: how often a Flower process's SuperExec looks for work (every second
    by default in Flower). A SuperNode's looks for a message to start a ClientApp for, a
    delay added to every message, so 0.25 s; the SuperLink's only for a run to start the
    ServerApp for, once a run, and each look is a request the SuperLink serves: 1 s."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault(SUPEREXEC_POLL, str(superexec_poll))
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Ask a Flower process to stop; kill it if it has not within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
