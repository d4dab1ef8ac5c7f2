"""The server's checkpoint after every round: enough to resume a crashed run at the next
round, aggregating as if it had never stopped (`fedmed server start --resume`,
`fedmed simulate --resume`).

It is a pickle, signed with the server's ledger key and read only once the signature
holds: whoever can write the run directory could otherwise run code as the user who
resumes, or have the server sign figures of their choosing."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature

from fedmed.errors import FedmedError
from fedmed.ledger.keys import KEY_STORE_ENV, KeyStore, Signer
from fedmed.ledger.server import SERVER
from fedmed.run.directory import RunDirectory, atomic_write

MAGIC = b"fedmed checkpoint 1\n"  # then the server's Ed25519 signature (64 bytes), then the pickle


@dataclass
class Checkpoint:
    round: int  # the last round completed
    config_sha256: str  # the run's settings: a resume must use the same
    arrays: dict[str, np.ndarray]  # the global model after `round`
    strategy: dict[str, Any]  # Recording.state(): the run's log, the nodes' state, optimiser moments
    ledger_run: str  # the server ledger's run id: hospitals keep writing the same ledgers
    client_dp: dict[str, Any] | None = None  # DP-FedAvg's step history and noise generator
    server: dict[str, Any] = field(default_factory=dict)  # last test metrics, hospitals' label counts


def save(out: RunDirectory, checkpoint: Checkpoint, signer: Signer) -> None:
    body = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(out / RunDirectory.CHECKPOINT, MAGIC + signer.sign(body) + body)


def load(out: RunDirectory, keys: KeyStore) -> Checkpoint:
    """The run's last checkpoint, once the server key in `keys` is found to have signed it."""
    path = out / RunDirectory.CHECKPOINT
    if not path.is_file():
        raise FedmedError(f"{out.path} has no checkpoint (no round finished before it stopped): start a new run without --resume")
    public = keys.public(SERVER)
    try:
        data = path.read_bytes()
        signature, body = data[len(MAGIC) : len(MAGIC) + 64], data[len(MAGIC) + 64 :]
        if public is None or not data.startswith(MAGIC):
            raise InvalidSignature
        public.verify(signature, body)
    except OSError as exc:
        raise FedmedError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    except InvalidSignature:
        raise FedmedError(
            f"{path} is not signed by the server key in {keys.root}: it was changed, or the run was made with another key store "
            f"(resume it with that one: {KEY_STORE_ENV}=..., or a deployed server's own state folder)"
        ) from None
    try:
        checkpoint = pickle.loads(body)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise FedmedError(f"cannot read the checkpoint {path}: {exc}; start a new run without --resume") from None
    if not isinstance(checkpoint, Checkpoint):
        raise FedmedError(f"{path} is not a fedmed checkpoint (it may come from an older fedmed); start a new run without --resume")
    return checkpoint
