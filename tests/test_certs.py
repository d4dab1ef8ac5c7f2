"""Deployment keys: the federation's CA and server certificate, a hospital's node key
pair; and a real SuperLink serving TLS with them on loopback."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from fedmed.deployment.certs import init_federation, site_keys
from fedmed.errors import FedmedError

from .conftest import assert_clean_failure, fedmed, free_port, wait_for_port


def test_the_server_certificate_is_signed_by_the_federation_ca_for_its_hosts(tmp_path):
    files = init_federation(tmp_path, ["fl.example.org", "127.0.0.1"], days=30)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]  # localhost: the operator's own commands
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_a_site_key_pair_is_what_flower_reads_and_nothing_is_overwritten(tmp_path):
    private, public = site_keys(tmp_path, "hospital-02")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    key = load_ssh_private_key(private.read_bytes(), password=None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert try_load_public_key(public)  # as `flwr supernode register` loads it
    before = private.read_bytes()
    with pytest.raises(FedmedError, match="never overwrites keys"):
        site_keys(tmp_path, "hospital-02")
    assert private.read_bytes() == before


def test_bad_certificate_requests_fail_with_one_line(tmp_path):
    assert_clean_failure(fedmed("certs", "site", "../escape", "--out", str(tmp_path)), "site name '../escape'")
    assert_clean_failure(fedmed("certs", "init", "--out", str(tmp_path), "--days", "0"), "--days must be at least 1")


@pytest.mark.slow
def test_a_superlink_serves_tls_with_the_certificates_and_refuses_plain_text(tmp_path):
    files = init_federation(tmp_path / "ours", ["localhost", "127.0.0.1"])
    other = init_federation(tmp_path / "other", ["localhost", "127.0.0.1"])
    port = free_port()
    superlink = Path(sys.executable).parent / "flower-superlink"
    command = [str(superlink), "--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile", str(files.server_cert),
               "--ssl-keyfile", str(files.server_key), "--host", "127.0.0.1", "--port", str(port), "--isolation", "process"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=60, alive=process)
        trusted = ssl.create_default_context(cafile=str(files.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        stranger = ssl.create_default_context(cafile=str(other.ca_cert))  # a node given the wrong CA
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLCertVerificationError):
            stranger.wrap_socket(raw, server_hostname="127.0.0.1")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:  # plain HTTP gets no HTTP answer
            plain.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            plain.settimeout(10)
            try:
                answer = plain.recv(64)
            except (ConnectionResetError, TimeoutError):
                answer = b""
            assert not answer.startswith(b"HTTP/")
    finally:
        process.terminate()
        process.wait(timeout=30)
