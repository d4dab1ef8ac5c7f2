"""Each party's Ed25519 key pair: created on first use, the private key readable by its
owner only, the public key published beside it for auditors."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.run.directory import write_new


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """One party's signing key."""

    def __init__(self, party: str, private: Ed25519PrivateKey) -> None:
        self.party = party
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def load_or_create(cls, key_dir: Path, party: str) -> Signer:
        """`KEY_DIR/PARTY.key` (mode 0600), created with `PARTY.pub` if missing."""
        key_dir.mkdir(parents=True, exist_ok=True)
        path = key_dir / f"{party}.key"
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            write_new(path, pem, 0o600)
        except FileExistsError:
            return cls(party, _read_private(path))
        signer = cls(party, private)
        public = signer.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (key_dir / f"{party}.pub").write_bytes(public)
        return signer

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def _read_private(path: Path) -> Ed25519PrivateKey:
    if path.stat().st_mode & 0o077:
        raise FedmedError(f"signing key {path} is readable by others: `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise FedmedError(f"signing key {path} is not a PEM private key: move it aside to create a new one") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FedmedError(f"signing key {path} is not an Ed25519 key")
    return key


def data_secret(key_dir: Path, party: str) -> bytes:
    """`KEY_DIR/PARTY.data-secret` (mode 0600, created once): the key of the HMAC with which
    this party's ledgers commit to its data. Without it, nobody holding a copy of a
    dataset can test whether this hospital trained on it; the hospital may reveal it to
    an auditor of its choice (`fedmed audit --data-secret`)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    path = key_dir / f"{party}.data-secret"
    try:
        write_new(path, secrets.token_hex(32).encode(), 0o600)
    except FileExistsError:
        pass
    return read_data_secret(path)


def read_data_secret(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        raise FedmedError(f"data secret {path} is readable by others: `chmod 600 {path}`")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise FedmedError(f"data secret {path} is not 64 hexadecimal digits: it was damaged, or is not a fedmed data secret")
    return bytes.fromhex(text)


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        raise FedmedError(f"public key {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FedmedError(f"public key {path} is not an Ed25519 key")
    return key


def valid(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True
