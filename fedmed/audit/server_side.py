"""The server's ledger: run start, each round's participants (with the checkpoint each
hospital signed), aggregation and new global model, and run end. Optionally the
round's updates, so an auditor can recompute the aggregate."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from torch import nn

from fedmed import __version__
from fedmed.audit.digests import architecture_digest, arrays_digest
from fedmed.audit.hospital_side import CHECKPOINT_KEY, REPLY_KEY, ROOT_KEY, RUN_KEY
from fedmed.audit.keys import Signer
from fedmed.audit.ledger import LedgerWriter
from fedmed.config import FedmedConfig
from fedmed.federation.records import DECLINED_KEY, WEIGHT_KEY, site_name

SERVER = "server"
LEDGERS = "ledgers"  # in the run directory: ledgers/<run id>/<party>.jsonl, ledgers/keys/<party>.pub
UPDATES = "updates"  # in the run directory: updates/round-NNN.npz


def _checkpoint(msg: Message) -> dict[str, Any] | None:
    """The hospital's signed checkpoint from its reply (None, for the audit to report, if
    it sent none or something else)."""
    try:
        checkpoint = json.loads(str(msg.content[REPLY_KEY]["checkpoint"]))
    except (KeyError, ValueError, RecursionError):
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


class ServerLedger:
    def __init__(self, run_dir: Path, save_updates: bool, run_id: str = "") -> None:
        """`run_id`: a resumed run's, to continue its ledger (and the hospitals' theirs)."""
        self.root = (run_dir / LEDGERS).resolve()
        self.run_id = run_id or uuid.uuid4().hex[:16]
        signer = Signer.load_or_create(self.root / "keys", SERVER)
        self.writer = LedgerWriter(self.root / self.run_id / f"{SERVER}.jsonl", signer, self.run_id)
        self.updates = run_dir / UPDATES if save_updates else None
        self.aggregation = ""

    def start(self, cfg: FedmedConfig, model: nn.Module, arrays: ArrayRecord, aggregation: str) -> None:
        self.aggregation = aggregation
        self.writer.append("run-start", 0, {
            "run": self.run_id,
            "config_sha256": cfg.digest(),
            "fedmed_version": __version__,
            "architecture_sha256": architecture_digest(model),
            "initial_model_sha256": arrays_digest(arrays),
            "hospitals": cfg.data.hospitals,
            "rounds": cfg.federation.rounds,
            "aggregation": aggregation,
            "privacy_mode": cfg.privacy.mode,
            "updates_saved": self.updates is not None,
        })

    def resume(self, after_round: int, aggregation: str) -> None:
        """A restarted server picks the run up after its last checkpoint."""
        self.aggregation = aggregation
        self.writer.append("resume", after_round, {"run": self.run_id, "after_round": after_round})

    def config_entries(self) -> dict[str, str]:
        """What every round's message carries: where simulated hospitals keep ledgers,
        the run id, and the server's latest signed checkpoint."""
        return {ROOT_KEY: str(self.root), RUN_KEY: self.run_id, CHECKPOINT_KEY: json.dumps(self.writer.checkpoint(), sort_keys=True)}

    def train_round(
        self,
        server_round: int,
        sent: ArrayRecord,
        accepted: list[Message],
        declined: list[Message],
        new: ArrayRecord | None,
        privacy: dict[str, Any] | None = None,
        silent: int = 0,
    ) -> None:
        """`silent`: hospitals asked that sent nothing before the timeout (failures too)."""
        ok = [m for m in accepted if not m.has_error()]
        participants = [
            {
                "hospital": site_name(m.content),
                "update_sha256": arrays_digest(m.content["arrays"]),
                "weight": next(iter(m.content.metric_records.values()))[WEIGHT_KEY],
                "checkpoint": _checkpoint(m),
            }
            for m in ok
        ]
        refusals = [
            {"hospital": site_name(m.content), "reason": str(m.content[DECLINED_KEY]["reason"]), "checkpoint": _checkpoint(m)} for m in declined
        ]
        if self.updates is not None and ok:
            self._save_updates(server_round, sent, ok)
        self.writer.append("train-round", server_round, {
            "aggregation": self.aggregation,
            "sent_sha256": arrays_digest(sent),
            "participants": participants,
            "declined": refusals,
            "failures": len(accepted) - len(ok) + silent,
            "new_global_sha256": arrays_digest(new) if new is not None else None,
            **({"privacy": privacy} if privacy else {}),
        })

    def evaluate_round(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> None:
        ok = [m for m in replies if not m.has_error()]
        self.writer.append("evaluate-round", server_round, {
            "sent_sha256": arrays_digest(sent),
            "participants": [{"hospital": site_name(m.content), "checkpoint": _checkpoint(m)} for m in ok],
            "failures": len(replies) - len(ok),
        })

    def end(self, final: ArrayRecord, rounds: int, test_accuracy: float | None) -> None:
        self.writer.append("run-end", rounds, {"final_model_sha256": arrays_digest(final), "test_accuracy": test_accuracy})

    def _save_updates(self, server_round: int, sent: ArrayRecord, ok: list[Message]) -> None:
        arrays = {f"sent/{k}": v.numpy() for k, v in sent.items()}
        for m in ok:
            arrays.update({f"{site_name(m.content)}/{k}": v.numpy() for k, v in m.content["arrays"].items()})
        self.updates.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=self.updates)
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, self.updates / f"round-{server_round:03d}.npz")
