"""Bad deployment input: one clear line and exit code 2, before any Flower process starts."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from fedmed.deployment.certs import init_federation, site_keys

from .conftest import assert_clean_failure, fedmed, free_port


@pytest.fixture
def site(tmp_path):
    """A hospital with a key, the federation's CA and (a little) data, in tmp_path."""
    init_federation(tmp_path / "server/certs", ["localhost"])
    site_keys(tmp_path / "sites/keys", "hospital-01")
    (tmp_path / "images").mkdir()

    def config(server: str, *extra: str, ca: str = "server/certs/ca.crt") -> Path:
        path = tmp_path / "site.toml"
        lines = ["[data]", 'source = "disk"', f'path = "{tmp_path / "images"}"',
                 "[site]", 'name = "hospital-01"', f'server = "{server}"', f'ca_cert = "{tmp_path / ca}"',
                 f'key = "{tmp_path / "sites/keys/hospital-01.key"}"', *extra]
        path.write_text("\n".join(lines) + "\n")
        return path

    return config


def _server_config(tmp_path: Path, port: int, certs: str = "server/certs") -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(f'[server]\naddress = "127.0.0.1:{port}"\ncerts = "{tmp_path / certs}"\nenrolled = "{tmp_path / "enrolled"}"\nstate = "{tmp_path / "state"}"\n')
    if not (tmp_path / "enrolled").exists():
        (tmp_path / "enrolled").mkdir()
        _, public = site_keys(tmp_path / "keys", "hospital-01")
        (tmp_path / "enrolled" / public.name).write_bytes(public.read_bytes())
    return path


def _expire(cert_path: Path, key_path: Path) -> None:
    """Re-issue the certificate self-signed and expired yesterday."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .sign(key, hashes.SHA384()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_a_site_config_without_a_data_path_is_refused(site, tmp_path):
    path = site("127.0.0.1:1")
    path.write_text(path.read_text().replace('source = "disk"', 'source = "demo"').replace(f'path = "{tmp_path / "images"}"\n', ""))
    assert_clean_failure(fedmed("site", "start", "--config", str(path)), "names no data")


def test_a_missing_or_expired_ca_certificate_is_refused(site, tmp_path):
    assert_clean_failure(fedmed("site", "start", "--config", str(site("127.0.0.1:1", ca="nowhere/ca.crt"))), "does not exist")
    _expire(tmp_path / "server/certs/ca.crt", tmp_path / "server/certs/ca.key")
    assert_clean_failure(fedmed("site", "start", "--config", str(site("127.0.0.1:1"))), "expired on")


def test_an_unreachable_server_is_refused(site):
    assert_clean_failure(fedmed("site", "start", "--config", str(site(f"127.0.0.1:{free_port()}"))), "cannot reach the server")


def test_a_server_with_a_certificate_from_another_ca_is_refused(site, tmp_path):
    other = init_federation(tmp_path / "other", ["localhost", "127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(other.server_cert, other.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert_clean_failure(fedmed("site", "start", "--config", str(site(f"127.0.0.1:{port}"))), "is not the federation's")
    finally:
        listener.close()
        thread.join(timeout=5)


def test_the_server_refuses_a_busy_port_missing_or_expired_certificates(tmp_path):
    init_federation(tmp_path / "server/certs", ["localhost"])
    with socket.create_server(("127.0.0.1", 0)) as busy:
        config = _server_config(tmp_path, busy.getsockname()[1])
        assert_clean_failure(fedmed("server", "start", "--config", str(config)), "is not free")
    config = _server_config(tmp_path, free_port(), certs="elsewhere")
    assert_clean_failure(fedmed("server", "start", "--config", str(config)), "does not exist")
    _expire(tmp_path / "server/certs/server.crt", tmp_path / "server/certs/server.key")
    config = _server_config(tmp_path, free_port())
    assert_clean_failure(fedmed("server", "start", "--config", str(config)), "expired on")
    assert not (tmp_path / "state").exists()  # nothing started, nothing written


def test_the_control_client_names_a_superlink_that_does_not_answer(tmp_path):
    from fedmed.deployment.control import Control
    from fedmed.errors import FedmedError

    init_federation(tmp_path / "certs", ["localhost"])
    with Control(f"127.0.0.1:{free_port()}", tmp_path / "certs/ca.crt", tmp_path / "superlink.log", timeout=5) as control:
        with pytest.raises(FedmedError, match=r"did not answer \(list nodes: ConnectError\): is it running\? \(log: .*superlink.log\)"):
            control.nodes()
    with pytest.raises(FedmedError, match="cannot read the CA certificate"):
        Control("127.0.0.1:1", tmp_path / "missing.crt", tmp_path / "superlink.log")


def test_a_status_with_no_server_running_says_so(tmp_path):
    init_federation(tmp_path / "server/certs", ["localhost"])
    config = _server_config(tmp_path, free_port())
    state = tmp_path / "state"
    state.mkdir()
    (state / "current.json").write_text(json.dumps({"run_id": "1", "run_dir": str(tmp_path / "run"), "config": {"federation.rounds": 2}}))
    result = fedmed("server", "status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "run 1: server not running; 0 of 2 rounds done" in result.stdout
