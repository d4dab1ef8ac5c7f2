"""The federation's certificates and keys, made with the `cryptography` package.

The coordinating centre creates a CA and the server's TLS certificate (`fedmed certs
init`); each hospital creates its node's key pair on its own machine (`fedmed certs
site NAME`) and hands over only the public key, which the server enrols. Private keys
are written with owner-only permissions and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.config import SITE_NAME
from fedmed.errors import FedmedError
from fedmed.run.directory import write_new

CURVE = ec.SECP384R1()  # a NIST curve: Flower's node authentication accepts no other kind


@dataclass(frozen=True)
class ServerFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def under(cls, folder: Path) -> ServerFiles:
        return cls(folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key")


def _write(path: Path, data: bytes, private: bool) -> None:
    try:
        write_new(path, data, 0o600 if private else 0o644)
    except FileExistsError:
        raise FedmedError(f"{path} already exists: fedmed never overwrites keys; move it aside or choose another --out") from None


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def init_federation(folder: Path, hosts: list[str], days: int = 365, name: str = "fedmed federation") -> ServerFiles:
    """A CA and the server's certificate for `hosts` (names and IP addresses clients dial)."""
    if not hosts:
        raise FedmedError("give the server's host names or addresses with --host (e.g. --host fl.example.org --host 10.0.0.5)")
    if days < 1:
        raise FedmedError(f"--days must be at least 1 (got {days})")
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))  # the operator's own commands dial it locally
    files = ServerFiles.under(folder)
    existing = [p for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
    if existing:
        raise FedmedError(f"{existing[0]} already exists: fedmed never overwrites keys; move it aside or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate a little clock skew
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def site_keys(folder: Path, site: str) -> tuple[Path, Path]:
    """A hospital node's authentication key pair (OpenSSH format, as Flower reads it):
    `SITE.key` stays on the hospital's machine, `SITE.pub` goes to the server's operator."""
    if not SITE_NAME.fullmatch(site):
        raise FedmedError(f"site name {site!r}: use letters, digits, '-', '_' or '.', e.g. hospital-02")
    private, public = folder / f"{site}.key", folder / f"{site}.pub"
    for path in (private, public):
        if path.exists():
            raise FedmedError(f"{path} already exists: fedmed never overwrites keys; move it aside or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE)
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public, openssh + f" {site}\n".encode(), private=False)
    return private, public
