"""Each party's Ed25519 key pair: created on first use, the private key readable by its
owner only, the public key published beside it for auditors.

Private keys never go into a run directory: whoever holds the run directory (a
reviewer, a shared drive) could otherwise re-sign edited records. A simulation's
parties sign with keys in the user's key store (`KeyStore`), a deployed server with
keys in its state folder, a deployed hospital with keys in its own ledger folder. The
key store also keeps, per run, the public keys that signed it (a trust file): what
`fedmed audit --keys` takes, from outside the run."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmed.errors import FedmedError
from fedmed.run.directory import atomic_write, write_new

KEY_STORE_ENV = "FEDMED_KEY_STORE"  # where simulations keep their parties' keys (default: XDG data home)


def raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a key, as ledger records carry it (not a fingerprint to trust)."""
    return hashlib.sha256(raw(public)).hexdigest()[:16]


def fingerprint(public: Ed25519PublicKey) -> str:
    """The key's full SHA-256: what an operator may write down instead of the key."""
    return "sha256:" + hashlib.sha256(raw(public)).hexdigest()


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


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
        (key_dir / f"{party}.pub").write_bytes(public_pem(signer.public))
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


def default_key_store() -> Path:
    """`$FEDMED_KEY_STORE`, else `$XDG_DATA_HOME/fedmed/keys` (`~/.local/share/fedmed/keys`)."""
    if os.environ.get(KEY_STORE_ENV):
        return Path(os.environ[KEY_STORE_ENV]).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "fedmed" / "keys"


class KeyStore:
    """A folder of parties' signing keys and data secrets (mode 0700, files 0600), outside
    any run directory, and `runs/<ledger run id>.toml`: the public keys that signed each
    run, written by the process that holds the keys (a trust file for `fedmed audit --keys`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _folder(self) -> Path:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise FedmedError(f"cannot create the key store {self.root}: {exc.strerror} (set {KEY_STORE_ENV} to a folder of yours)") from None
        return self.root

    def signer(self, party: str) -> Signer:
        return Signer.load_or_create(self._folder(), party)

    def data_secret(self, party: str) -> bytes:
        return data_secret(self._folder(), party)

    def public(self, party: str) -> Ed25519PublicKey | None:
        """The party's public key, None if the store holds none."""
        path = self.root / f"{party}.pub"
        return load_public(path) if path.is_file() else None

    def trust_file(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.toml"

    def trust(self, run_id: str, signers: list[Signer]) -> Path:
        """Write the trust file of `run_id`: each party's public key, from the keys themselves."""
        path = self.trust_file(run_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = {s.party: "ed25519:" + base64.b64encode(raw(s.public)).decode() for s in sorted(signers, key=lambda s: s.party)}
        header = (
            f"# fedmed: the public keys that signed ledger run {run_id}, written by the process that held them.\n"
            "# Keep it (or the server's fingerprint) apart from the run directory; audit with\n"
            f"# `fedmed audit RUN --keys {path.name}`.\n"
        )
        atomic_write(path, header + tomli_w.dumps({"run": run_id, "keys": keys}), private=False)
        return path


@dataclass(frozen=True)
class TrustedKey:
    """A party's public key as an auditor trusts it: the key itself, or (a fingerprint
    written down) only its digest, to be matched with the run's copy of the key."""

    party: str
    source: str  # where it came from, for the report
    public: Ed25519PublicKey | None = None
    fingerprint: str = ""
    run: str = ""  # the ledger run id its trust file names, if any

    @property
    def digest(self) -> str:
        """The fingerprint of the key, given or computed."""
        return fingerprint(self.public) if self.public else self.fingerprint

    def matches(self, public: Ed25519PublicKey) -> bool:
        return fingerprint(public) == self.digest


def read_trusted(path: Path) -> list[TrustedKey]:
    """Trusted keys from a file given to `fedmed audit --keys`: a trust file (TOML, `[keys]`
    of party = "ed25519:<base64>" or "sha256:<hex>"), or one party's PEM `PARTY.pub`."""
    if not path.is_file():
        raise FedmedError(f"--keys {path}: no such file")
    if path.suffix == ".pub":
        return [TrustedKey(path.stem, f"--keys {path}", public=load_public(path))]
    try:
        parsed = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FedmedError(f"--keys {path} is neither a PARTY.pub nor a fedmed trust file (TOML): {exc}") from None
    table, run = parsed.get("keys"), str(parsed.get("run", ""))
    if not isinstance(table, dict) or not table:
        raise FedmedError(f"--keys {path} has no [keys] table of party = \"ed25519:...\" or \"sha256:...\"")
    return [replace(_trusted(party, value, f"--keys {path}"), run=run) for party, value in table.items()]


def _trusted(party: str, value: object, source: str) -> TrustedKey:
    text = str(value)
    kind, _, body = text.partition(":")
    if kind == "sha256" and len(body) == 64 and all(c in "0123456789abcdef" for c in body):
        return TrustedKey(party, source, fingerprint=text)
    if kind == "ed25519":
        try:
            return TrustedKey(party, source, public=Ed25519PublicKey.from_public_bytes(base64.b64decode(body, validate=True)))
        except (binascii.Error, ValueError):
            pass
    raise FedmedError(f"{source}: the key for {party} is neither \"ed25519:<base64 of 32 bytes>\" nor \"sha256:<64 hex digits>\"")
