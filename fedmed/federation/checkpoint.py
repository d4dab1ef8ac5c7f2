"""The server's checkpoint after every round: enough to resume a crashed run at the next
round, aggregating as if it had never stopped (`fedmed server start --resume`)."""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.errors import FedmedError

CHECKPOINT = "checkpoint.pkl"


@dataclass
class Checkpoint:
    round: int  # the last round completed
    config_sha256: str  # the run's settings: a resume must use the same
    arrays: dict[str, np.ndarray]  # the global model after `round`
    strategy: dict[str, Any]  # Recording.state()
    ledger_run: str  # the server ledger's run id: hospitals keep writing the same ledgers
    client_dp: dict[str, Any] | None = None  # DP-FedAvg's privacy ledger and noise generator
    server: dict[str, Any] = field(default_factory=dict)  # last test metrics, hospitals' label counts


def save(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Atomic: a crash leaves the previous checkpoint or this one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}-", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(asdict(checkpoint), handle, protocol=pickle.HIGHEST_PROTOCOL)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, run_dir / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(run_dir: Path) -> Checkpoint:
    """The run's last checkpoint (written by this server: pickle is safe here, as it is
    never read from anyone else)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FedmedError(f"{run_dir} has no checkpoint (no round finished before it stopped): start a new run without --resume")
    try:
        with path.open("rb") as handle:
            return Checkpoint(**pickle.load(handle))
    except (OSError, pickle.UnpicklingError, EOFError, TypeError) as exc:
        raise FedmedError(f"cannot read the checkpoint {path}: {exc}; start a new run without --resume") from None
