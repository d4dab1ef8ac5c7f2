"""A hospital's ledger: where it lives, what the hospital records each round, and the
signed checkpoint of it that the hospital returns to the server with every reply. Beside
it, in the same folder: the hospital's keys, its data secret, its lifetime privacy
budgets (`fedmed.ledger.budget`) and, with FedBN, its own normalisation layers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from fedmed import __version__
from fedmed.config import FedmedConfig
from fedmed.data.sites import SiteData
from fedmed.errors import FedmedError
from fedmed.ledger.budget import LifetimeBudget
from fedmed.ledger.chain import LedgerFile, LedgerWriter
from fedmed.ledger.digests import architecture_digest, data_commitment
from fedmed.ledger.keys import Signer, data_secret
from fedmed.privacy.canaries import Canaries

RUN_ID = re.compile(r"[0-9a-f]{16}")  # a folder name under the node's ledger directory, nothing else


class HospitalLedger:
    def __init__(self, root: Path, writer: LedgerWriter, secret: bytes) -> None:
        self.root, self.writer, self._secret = root, writer, secret
        self.commitment = ""  # to this hospital's data, once `begin` has seen it

    @classmethod
    def open(cls, root: Path, run_id: str, site: str, keys: Path | None = None) -> HospitalLedger:
        """`root/<run id>/<site>.jsonl`, signed with `KEYS/<site>.key`; its data committed
        to with `KEYS/<site>.data-secret` (both created on first use). KEYS: a real node's
        own `root/keys`; a simulated hospital's, the user's key store (never the run
        directory, where `root` is)."""
        if not RUN_ID.fullmatch(run_id):
            raise FedmedError("the server sent a malformed ledger run id: refusing to write this hospital's ledger")
        keys = keys or root / "keys"
        try:
            signer = Signer.load_or_create(keys, site)
            return cls(root, LedgerWriter(root / run_id / f"{site}.jsonl", signer, run_id), data_secret(keys, site))
        except OSError as exc:
            raise FedmedError(f"cannot write this hospital's ledger under {root}: {exc.strerror}") from None

    @property
    def folder(self) -> Path:
        """This run's folder of the hospital's ledger directory."""
        return self.writer.path.parent

    def lifetime(self, n: int) -> LifetimeBudget:
        """The privacy this hospital has spent on its data (as committed to; `n` training
        images) over all runs."""
        return LifetimeBudget.open(self.root, self.writer.signer, self.commitment, n)

    def begin(
        self, cfg: FedmedConfig, server_round: int, model: nn.Module, site: SiteData, canaries: Canaries | None,
        server_checkpoint: dict[str, Any] | None,
    ) -> None:
        """The run-start record on first contact, then the server's checkpoint, if sent."""
        self.commitment = data_commitment(self._secret, site.train.x, site.train.y, site.test.x, site.test.y)
        if self.writer.seq == 0:
            self.writer.append("run-start", server_round, {
                "run": self.writer.run_id,
                "config_sha256": cfg.digest(),
                "fedmed_version": __version__,
                "architecture_sha256": architecture_digest(model),
                "data_commitment": self.commitment,
                "train_images": len(site.train),
                "test_images": len(site.test),
                "canaries": None if canaries is None else {"m": len(canaries.y), "seed": canaries.seed, "included": int(canaries.included.sum())},
            })
        if server_checkpoint is not None:
            self.writer.append("server-checkpoint", server_round, server_checkpoint)

    def privacy_spent(self) -> list[tuple[float, float, int]]:
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

    def checkpoint(self) -> dict[str, Any]:
        """The signed checkpoint of this ledger, for the server to record."""
        return self.writer.checkpoint()
