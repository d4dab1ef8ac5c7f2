"""A hospital's ledger: where it lives, what it records each round, and the signed
checkpoint it returns to the server with every reply."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedmed import __version__
from fedmed.audit.canaries import Canaries
from fedmed.audit.digests import architecture_digest, tensors_digest
from fedmed.audit.keys import Signer
from fedmed.audit.ledger import LedgerFile, LedgerWriter
from fedmed.config import FedmedConfig
from fedmed.data.sites import SiteData
from fedmed.errors import FedmedError
from torch import nn

NODE_LEDGER_DIR = "ledger-dir"  # a real node's own node config: its ledgers and signing key
ROOT_KEY, RUN_KEY, CHECKPOINT_KEY = "ledger-root", "ledger-run", "ledger-checkpoint"  # in the server's round config
RUN_ID = re.compile(r"[0-9a-f]{16}")  # a folder name under the node's ledger directory, nothing else
REPLY_KEY = "ledger"  # ConfigRecord in every reply: {"checkpoint": the hospital's, as JSON}


def ledger_root(context: Context, config: ConfigRecord) -> Path:
    """The node's own `ledger-dir` if it has one; otherwise the folder the server names
    (a simulation's run directory: simulated hospitals share the researcher's disk)."""
    chosen = context.node_config.get(NODE_LEDGER_DIR) or config.get(ROOT_KEY)
    if not chosen:
        raise FedmedError(f"this node has no `{NODE_LEDGER_DIR}` in its node config: set one for its training ledgers")
    return Path(str(chosen)).expanduser()


class HospitalLedger:
    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    @classmethod
    def open(cls, context: Context, config: ConfigRecord, site: str) -> HospitalLedger:
        if RUN_KEY not in config:
            raise FedmedError("the server sent no ledger run id: it runs an older fedmed; upgrade the server")
        root, run = ledger_root(context, config), str(config[RUN_KEY])
        if not RUN_ID.fullmatch(run):
            raise FedmedError("the server sent a malformed ledger run id: refusing to write this hospital's ledger")
        try:
            signer = Signer.load_or_create(root / "keys", site)
            return cls(LedgerWriter(root / run / f"{site}.jsonl", signer, run))
        except OSError as exc:
            raise FedmedError(f"cannot write this hospital's ledger under {root}: {exc.strerror}") from None

    def begin(
        self, cfg: FedmedConfig, server_round: int, config: ConfigRecord, model: nn.Module, site: SiteData, canaries: Canaries | None
    ) -> None:
        """The run-start record on first contact, then the server's checkpoint, if sent."""
        if self.writer.seq == 0:
            self.writer.append("run-start", server_round, {
                "run": self.writer.run_id,
                "config_sha256": cfg.digest(),
                "fedmed_version": __version__,
                "architecture_sha256": architecture_digest(model),
                "data_sha256": tensors_digest(site.train.x, site.train.y, site.test.x, site.test.y),
                "train_images": len(site.train),
                "test_images": len(site.test),
                "canaries": None if canaries is None else {"m": len(canaries.y), "seed": canaries.seed, "included": int(canaries.included.sum())},
            })
        if CHECKPOINT_KEY in config:
            self.writer.append("server-checkpoint", server_round, json.loads(str(config[CHECKPOINT_KEY])))

    def dp_spent(self) -> list[tuple[float, float, int]]:
        """(sigma, sample rate, steps) of every DP-SGD round this hospital trained in this
        run, from its own ledger: its budget survives a restart of the node or the server."""
        if self.writer.seq == 0:
            return []
        spent = []
        for record in LedgerFile.read(self.writer.path).records:
            privacy = (record or {}).get("payload", {}).get("privacy") or {}
            if record and record.get("event") == "train" and privacy.get("mode") == "sample" and privacy.get("steps"):
                spent.append((float(privacy["sigma"]), float(privacy["sample_rate"]), int(privacy["steps"])))
        return spent

    def record(self, event: str, server_round: int, payload: dict[str, Any]) -> None:
        self.writer.append(event, server_round, payload)

    def reply_record(self) -> ConfigRecord:
        return ConfigRecord({"checkpoint": json.dumps(self.writer.checkpoint(), sort_keys=True)})
