"""The server's ledger: run start, each round's participants (with the checkpoint each
hospital signed), aggregation and new global model, and run end; optionally the round's
updates, so an auditor can recompute the aggregate. It records the round's outcome as
the strategy typed it (`fedmed.run.record.RoundOutcome`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from fedmed import __version__
from fedmed.config import FedmedConfig
from fedmed.ledger.chain import LedgerWriter
from fedmed.ledger.digests import architecture_digest, arrays_digest, file_sha256, state_digest
from fedmed.ledger.keys import KeyStore, Signer, public_pem, read_trusted
from fedmed.run.directory import RunDirectory, atomic_write, json_safe
from fedmed.run.record import RoundOutcome

# Names in a round's saved updates (`updates/round-N.npz`) beside each hospital's `HOSPITAL/KEY`:
# the model sent, SCAFFOLD's control changes, the aggregation's state before the step ('@'
# is in no hospital's name).
SENT, CONTROL, STATE = "sent", "@control", "@state"
SERVER = "server"  # the server's party name: ledgers/<run id>/server.jsonl, ledgers/keys/server.pub
# The files the server signs at the end of a run (`ServerLedger.end`), by a label (a file
# name in a ledger would read as one from a hospital's data); the JSON ones' figures too.
REPORTED_FILES = {
    "summary": RunDirectory.SUMMARY, "heterogeneity": RunDirectory.HETEROGENEITY, "model": RunDirectory.MODEL, "heatmap": RunDirectory.HEATMAP,
    "scores": RunDirectory.SCORES,
}  # fmt: skip
REPORTED_JSON = ("summary", "heterogeneity")


class ServerLedger:
    def __init__(self, out: RunDirectory, save_updates: bool, keys: KeyStore, run_id: str = "") -> None:
        """The server signs with `keys` (a simulation's: the user's key store; a deployed
        server's: its state folder's), never with a key in the run directory. `run_id`: a
        resumed run's, to continue its ledger (and the hospitals' theirs)."""
        self.out = out
        self.root = (out / RunDirectory.LEDGERS).resolve()
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.keys = keys
        self.copies = self.root / "keys"
        self.copies.mkdir(parents=True, exist_ok=True)
        self.server_key = keys.signer(SERVER)
        self.signers: dict[str, Signer] = {}
        # A resumed simulation's hospitals so far: the store's trust file for the run names them
        # (never the run directory's copies, which anyone holding the directory can edit).
        earlier = [t.party for t in read_trusted(keys.trust_file(run_id)) if t.party != SERVER] if run_id and keys.trust_file(run_id).is_file() else []
        self.trust_file = self._trust([self.server_key, *(keys.signer(site) for site in earlier)])
        self.writer = LedgerWriter(self.root / self.run_id / f"{SERVER}.jsonl", self.server_key, self.run_id)
        self.save_updates = save_updates
        self.aggregation = ""

    def admit(self, hospitals: list[str]) -> None:
        """Simulated hospitals about to be asked, who sign with keys from the same store:
        the new ones' keys (created now if need be), with the server's, go into the
        store's trust file for this run and, as convenience copies an auditor must not rely
        on, into the run's `ledgers/keys/`. A federation of thousands keeps keys only for
        the hospitals it asks."""
        new = [site for site in hospitals if site not in self.signers]
        if new:
            self.trust_file = self._trust([self.keys.signer(site) for site in new])

    def _trust(self, signers: list[Signer]) -> Path:
        for signer in signers:
            self.signers[signer.party] = signer
            atomic_write(self.copies / f"{signer.party}.pub", public_pem(signer.public), private=False)
        return self.keys.trust(self.run_id, list(self.signers.values()))

    def start(self, cfg: FedmedConfig, model: nn.Module, arrays: ArrayRecord, aggregation: str, hospital_config_sha256: str) -> None:
        """`hospital_config_sha256`: the digest of the settings the hospitals are sent (a
        real node is sent fewer than the server has), which each records at its run start."""
        self.aggregation = aggregation
        self.writer.append("run-start", 0, {
            "run": self.run_id,
            "config_sha256": cfg.digest(),
            "hospital_config_sha256": hospital_config_sha256,
            "fedmed_version": __version__,
            "architecture_sha256": architecture_digest(model),
            "initial_model_sha256": arrays_digest(arrays),
            "hospitals": cfg.data.hospitals,
            "rounds": cfg.federation.rounds,
            "aggregation": aggregation,
            "privacy_mode": cfg.privacy.mode,
            "updates_saved": self.save_updates,
        })

    def resume(self, after_round: int, aggregation: str) -> None:
        """A restarted server picks the run up after its last checkpoint."""
        self.aggregation = aggregation
        self.writer.append("resume", after_round, {"run": self.run_id, "after_round": after_round})

    def checkpoint(self) -> dict[str, Any]:
        """The signed checkpoint of this ledger, for every hospital to record."""
        return self.writer.checkpoint()

    def train_round(
        self,
        outcome: RoundOutcome,
        sent: ArrayRecord,
        updates: Mapping[str, ArrayRecord],
        new: ArrayRecord | None,
        privacy: dict[str, Any] | None = None,
        controls: Mapping[str, ArrayRecord] | None = None,
        state: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """`updates`: the arrays each hospital in `outcome.trained` sent; `controls`:
        SCAFFOLD's control changes; `state`: the aggregation's server state before this
        round's step (moments, momentum, control variate), saved with the updates so the
        audit can replay the step."""
        trained = sorted(outcome.trained.items())
        if self.save_updates and trained:
            arrays = {f"{SENT}/{k}": v.numpy() for k, v in sent.items()}
            for site, _ in trained:
                arrays.update({f"{site}/{k}": v.numpy() for k, v in updates[site].items()})
                arrays.update({f"{CONTROL}/{site}/{k}": v.numpy() for k, v in (controls or {}).get(site, {}).items()})
            for name, values in (state or {}).items():
                arrays.update({f"{STATE}/{name}/{k}": v for k, v in values.items()})
            self.out.save_updates(outcome.round, arrays)
        self.writer.append("train-round", outcome.round, {
            "aggregation": self.aggregation,
            "sent_sha256": arrays_digest(sent),
            "asked": sorted(outcome.asked),  # drawn from the run seed and the round (fedmed.federation.sampling)
            "participants": [
                {"hospital": site, "update_sha256": u.update_sha256, "weight": u.weight, "checkpoint": u.checkpoint,
                 **({"control_sha256": u.control_sha256} if u.control_sha256 else {})} for site, u in trained
            ],  # fmt: skip
            **({"selected": outcome.selected} if outcome.selected is not None else {}),
            **({"state_sha256": state_digest(state)} if state is not None else {}),  # the aggregation's state before the step
            "declined": [
                {"hospital": site, "reason": d.reason, "checkpoint": d.checkpoint} for site, d in sorted(outcome.declined.items())
            ],
            "failures": len(outcome.dropped),
            "failed": [{"hospital": site, "reason": why} for site, why in sorted(outcome.dropped.items())],
            "new_global_sha256": arrays_digest(new) if new is not None else None,
            **({"privacy": privacy} if privacy else {}),
        })

    def evaluate_round(self, outcome: RoundOutcome, sent: ArrayRecord) -> None:
        self.writer.append("evaluate-round", outcome.round, {
            "sent_sha256": arrays_digest(sent),
            "asked": sorted(outcome.asked_to_evaluate),
            "participants": [{"hospital": site, "checkpoint": e.checkpoint} for site, e in sorted(outcome.evaluated.items())],
            "failures": outcome.evaluation_failures,
        })

    def round_record(self, record: dict[str, Any]) -> None:
        """A round's record as `metrics.jsonl` gets it, signed before it is written there."""
        self.writer.append("round-record", int(record["round"]), {"record": json_safe(record)})

    def end(self, final: ArrayRecord, rounds: int, test_accuracy: float | None) -> None:
        """The files the run reports (written before this), bound by their digests and,
        for the JSON ones, their figures; then the run's end."""
        self._reported(rounds)
        self.writer.append("run-end", rounds, {"final_model_sha256": arrays_digest(final), "test_accuracy": test_accuracy})

    def _reported(self, rounds: int) -> None:
        files = {label: file_sha256(self.out / name) for label, name in REPORTED_FILES.items()}
        figures = {label: self._json(REPORTED_FILES[label]) for label in REPORTED_JSON}
        self.writer.append("reported", rounds, {"files": files, "figures": figures})

    def _json(self, name: str) -> Any:
        path = self.out / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def interrupted(self, after_round: int, signal: str) -> None:
        """The run stopped by `signal` (SIGINT, SIGTERM) after its checkpoint of
        `after_round`: the files it reports so far (the heterogeneity report), then where it
        stopped. A resumed run continues this ledger with a resume record."""
        self._reported(after_round)
        self.writer.append("interrupted", after_round, {"run": self.run_id, "after_round": after_round, "signal": signal})
