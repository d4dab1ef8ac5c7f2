"""The server's checkpoint after every round: enough to resume a crashed run at the next
round, aggregating as if it had never stopped (`fedmed server start --resume`)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmed.errors import FedmedError
from fedmed.run.directory import RunDirectory, atomic_write


@dataclass
class Checkpoint:
    round: int  # the last round completed
    config_sha256: str  # the run's settings: a resume must use the same
    arrays: dict[str, np.ndarray]  # the global model after `round`
    strategy: dict[str, Any]  # Recording.state(): the run's log, the nodes' state, optimiser moments
    ledger_run: str  # the server ledger's run id: hospitals keep writing the same ledgers
    client_dp: dict[str, Any] | None = None  # DP-FedAvg's step history and noise generator
    server: dict[str, Any] = field(default_factory=dict)  # last test metrics, hospitals' label counts


def save(out: RunDirectory, checkpoint: Checkpoint) -> None:
    atomic_write(out / RunDirectory.CHECKPOINT, pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL))


def load(out: RunDirectory) -> Checkpoint:
    """The run's last checkpoint (written by this server: pickle is safe here, as it is
    never read from anyone else)."""
    path = out / RunDirectory.CHECKPOINT
    if not path.is_file():
        raise FedmedError(f"{out.path} has no checkpoint (no round finished before it stopped): start a new run without --resume")
    try:
        with path.open("rb") as handle:
            checkpoint = pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise FedmedError(f"cannot read the checkpoint {path}: {exc}; start a new run without --resume") from None
    if not isinstance(checkpoint, Checkpoint):
        raise FedmedError(f"{path} is not a fedmed checkpoint (it may come from an older fedmed); start a new run without --resume")
    return checkpoint
