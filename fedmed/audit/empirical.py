"""The empirical audit: the canaries committed in the canary hospital's ledger, scored
against the run's final model, give a lower bound on epsilon (canaries.py), reported
beside the epsilon that hospital claims; the bound must not exceed the claim."""

from __future__ import annotations

import math
from typing import Any

import torch

from fedmed.audit.claims import Spent
from fedmed.audit.consistency import run_config
from fedmed.audit.evidence import AuditInputError, Evidence, Finding
from fedmed.ledger.digests import arrays_digest
from fedmed.models import build_model
from fedmed.privacy import canaries as canary_mod
from fedmed.run.directory import RunDirectory

DEFAULT_DELTA = 1e-5  # for a run without DP, whose ledger logs no delta


def empirical(evidence: Evidence, spent: list[Spent]) -> tuple[list[Finding], dict[str, Any]]:
    cfg = run_config(evidence)
    model_path = evidence.run_dir / RunDirectory.MODEL if evidence.run_dir else None
    if cfg is None or model_path is None or not model_path.exists():
        raise AuditInputError("--empirical needs a run directory with config.toml and the final model (model.pt)")
    committed = _committed(evidence)
    if committed is None:
        raise AuditInputError("--empirical: this run had no canaries (set privacy.canaries, e.g. 200, and train again)")
    hospital, index, record = committed
    info = record["payload"]["canaries"]
    m, seed = int(info["m"]), int(info["seed"])
    where = evidence.parties[hospital].where(index)
    if (m, seed) != (cfg.privacy.canaries, canary_mod.seed_for(cfg.seed)):
        return [Finding("empirical", where, f"the canaries committed ({m}, seed {seed}) are not those config.toml makes ({cfg.privacy.canaries}, seed {canary_mod.seed_for(cfg.seed)})")], {}
    canaries = canary_mod.make(seed, m, cfg.data.image_size, cfg.data.num_classes)
    initial = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    starts = evidence.server.events("run-start")
    if not starts or arrays_digest(initial.state_dict()) != starts[0][1]["payload"].get("initial_model_sha256"):
        return [Finding("empirical", RunDirectory.CONFIG, "the initial model it builds is not the one the server's ledger recorded: the canaries cannot be scored")], {}
    final = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    final.load_state_dict(torch.load(model_path, weights_only=True))
    scores = canary_mod.scores(initial, final, canaries)
    k = max(1, m // 4)
    r, v = canary_mod.guesses(scores, canaries.included, k)
    claim = next((s for s in spent if s.party in (hospital, "server")), None)
    delta = claim.delta if claim else DEFAULT_DELTA
    bound = canary_mod.epsilon_lower_bound(m, r, v, delta)
    claimed = claim.recomputed if claim else math.inf
    result = {
        "hospital": hospital, "canaries": m, "included": int(canaries.included.sum()), "guesses": r, "correct": v,
        "confidence": canary_mod.CONFIDENCE, "delta": delta, "epsilon_lower_bound": bound,
        "claimed_epsilon": None if math.isinf(claimed) else claimed,
    }
    findings = []
    if bound > claimed:
        findings.append(Finding("empirical", where, f"the canaries show epsilon of at least {bound:.2f} (95 % confidence; {v} of {r} membership guesses right), above the {claimed:.2f} claimed: the training was less private than its ledger says (noise off or mis-logged?)"))
    return findings, result


def _committed(evidence: Evidence) -> tuple[str, int, dict[str, Any]] | None:
    for name, hospital in evidence.hospitals.items():
        for index, record in hospital.events("run-start"):
            if record["payload"].get("canaries"):
                return name, index, record
    return None
