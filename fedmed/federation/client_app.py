"""The hospital's ClientApp: the same object runs in simulation and on a real SuperNode.

The server sends the global model and the run config; the hospital trains or
evaluates on its own data and returns weights plus aggregate metrics. Nothing
about individual images (names, paths, pixels, per-image losses) leaves.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedmed.config import FedmedConfig
from fedmed.data.sites import SiteData, site_data
from fedmed.errors import FedmedError
from fedmed.federation import policy, wire
from fedmed.ledger.digests import architecture_digest, arrays_digest
from fedmed.ledger.hospital import HospitalLedger
from fedmed.models import build_model, norm_keys
from fedmed.privacy import canaries
from fedmed.seeds import derive_seed
from fedmed.training.loop import evaluate as evaluate_model
from fedmed.training.loop import train as train_model
from fedmed.training.partial import informative_examples, known_labels, label_metrics

if TYPE_CHECKING:
    from fedmed.privacy.hospital import HospitalPrivacy

app = ClientApp()
FEDBN_LAYERS = "fedbn-layers"  # in the node's context.state: this hospital's own normalisation layers


@dataclass(frozen=True)
class Request:
    """What a request brings to this hospital, unpacked once."""

    cfg: FedmedConfig  # the round's settings, from the server
    own: FedmedConfig | None  # a real hospital's own site config; None when simulated
    server_round: int
    site: SiteData  # this hospital's data (with the audit's canaries, if any)
    model: nn.Module  # the global model (with FedBN, this hospital's own layers put back)
    layers_restored: int  # FedBN: how many arrays were put back
    ledger: HospitalLedger  # the server's checkpoint already recorded in it


def _site(context: Context, cfg: FedmedConfig, own: FedmedConfig | None) -> SiteData:
    """This node's hospital: a real node's own data (its site config), or a simulated
    hospital's share, `partition-id` in its node config (set by the simulation engine)."""
    if own is not None:
        index, data_cfg = 0, policy.hospital_config(cfg, own)
    elif wire.PARTITION_ID in context.node_config:
        index, data_cfg = int(context.node_config[wire.PARTITION_ID]), cfg
    else:
        raise FedmedError(f"this node has neither `{wire.SITE_CONFIG}` nor `{wire.PARTITION_ID}` in its node config: it cannot find its data")
    try:
        site = site_data(data_cfg, index)
    except Exception as exc:  # noqa: BLE001
        # The reason may name files on this machine; it stays in this node's log, and the
        # server (which sees this exception's text) learns only that the data failed.
        print(f"fedmed: this hospital's data cannot be used: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise FedmedError("this hospital's data cannot be used (the reason is in the hospital's own log)") from None
    if own is None:
        return site
    # Its own name, and a stream of its own for batches and noise: every real node's data is index 0.
    stream = int.from_bytes(hashlib.sha256(own.site.name.encode()).digest()[:4], "big")
    return replace(site, name=own.site.name, index=stream)


def _canaries(cfg: FedmedConfig, site: SiteData, real: bool) -> canaries.Canaries | None:
    """Simulated hospitals only: a real hospital never trains on images it did not see."""
    if real or not cfg.privacy.canaries or site.index != canaries.CANARY_HOSPITAL:
        return None
    return canaries.make(canaries.seed_for(cfg.seed), cfg.privacy.canaries, cfg.data.image_size, cfg.data.num_classes)


def _ledger(context: Context, config: ConfigRecord, site: str) -> HospitalLedger:
    """The node's own ledger folder (`ledger-dir`) if it has one; otherwise the folder the
    server names (a simulation's run directory: simulated hospitals share the researcher's disk)."""
    if wire.LEDGER_RUN not in config:
        raise FedmedError("the server sent no ledger run id: it runs an older fedmed; upgrade the server")
    root = context.node_config.get(wire.LEDGER_DIR) or config.get(wire.LEDGER_ROOT)
    if not root:
        raise FedmedError(f"this node has no `{wire.LEDGER_DIR}` in its node config: set one for its training ledgers")
    return HospitalLedger.open(Path(str(root)).expanduser(), str(config[wire.LEDGER_RUN]), site)


def _receive(msg: Message, context: Context) -> Request:
    config = msg.content[wire.CONFIG]
    cfg = wire.config_from_record(config)
    own = policy.site_settings(dict(context.node_config))
    server_round = int(config[wire.SERVER_ROUND])
    site = _site(context, cfg, own)
    added = _canaries(cfg, site, own is not None)
    if added is not None:
        site = canaries.add_to(site, added)
    model = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    ledger = _ledger(context, config, site.name)
    ledger.begin(cfg, server_round, model, site, added, wire.server_checkpoint(config))
    model.load_state_dict(msg.content[wire.ARRAYS].to_torch_state_dict())
    restored = 0
    if cfg.federation.strategy == "fedbn" and FEDBN_LAYERS in context.state:
        kept = context.state[FEDBN_LAYERS].to_torch_state_dict()
        model.load_state_dict(kept, strict=False)
        restored = len(kept)
    return Request(cfg, own, server_round, site, model, restored, ledger)


def _shared_arrays(cfg: FedmedConfig, model: nn.Module, context: Context) -> ArrayRecord:
    """What goes back to the server; FedBN keeps the normalisation layers here, in the
    node's state, for the next round."""
    state = model.state_dict()
    if cfg.federation.strategy != "fedbn":
        return ArrayRecord(state)
    kept = norm_keys(model)
    context.state[FEDBN_LAYERS] = ArrayRecord({k: v for k, v in state.items() if k in kept})
    return ArrayRecord({k: v for k, v in state.items() if k not in kept})


def _privacy_entry(cfg: FedmedConfig, private: HospitalPrivacy | None, steps: int) -> dict[str, Any]:
    """The DP settings a ledger records for one round (steps: this round's)."""
    if private is None:
        return {"mode": cfg.privacy.mode}
    p = private.plan
    return {
        "mode": "sample", "accountant": p.accountant, "sigma": p.sigma, "sample_rate": p.rate, "steps": steps,
        "max_grad_norm": p.max_grad_norm, "delta": p.delta, "secure_mode": False,
        "noise": "run seed" if p.reproducible else "system entropy",
        "epsilon": private.history.epsilon(p.delta), "budget": private.budget,
    }


def _hospital_privacy(r: Request) -> HospitalPrivacy | None:
    """This hospital's DP-SGD plan and what it has spent so far (sample-level DP only:
    Opacus takes a second to import, so only then)."""
    if r.cfg.privacy.mode != "sample":
        return None
    from fedmed.privacy.hospital import HospitalPrivacy

    own_budget = r.own.site.max_epsilon if r.own else 0.0
    return HospitalPrivacy.load(r.cfg, r.site.name, len(r.site.train.y), r.ledger.privacy_spent(), own_budget)


def _decline(msg: Message, r: Request, private: HospitalPrivacy | None, received: str, reason: str) -> Message:
    print(f"fedmed: {r.site.name} declines round {r.server_round}: {reason}", file=sys.stderr)
    r.ledger.record("declined", r.server_round, {"received_sha256": received, "reason": reason, "privacy": _privacy_entry(r.cfg, private, 0)})
    refusal = ConfigRecord({"reason": reason, **(private.metrics() if private else {})})  # nothing about patients
    return wire.reply(msg, r.site.name, r.ledger.checkpoint(), **{wire.DECLINED: refusal})


@app.train()
def train(msg: Message, context: Context) -> Message:
    r = _receive(msg, context)
    cfg, site = r.cfg, r.site
    received = arrays_digest(msg.content[wire.ARRAYS])
    private = _hospital_privacy(r)
    reason = None
    if r.own is not None:
        reason = policy.refusal(r.own, cfg, r.server_round, architecture_digest(r.model), private.plan.sigma if private else None)
    reason = reason or (private.refusal() if private else None)
    if reason:
        return _decline(msg, r, private, received, reason)
    mu = cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0
    possible, annotated, pseudo = known_labels(cfg, r.model, site.train)
    stats = train_model(
        r.model, site.train.x, site.train.y, cfg.train, seed=derive_seed(cfg.seed, r.server_round, site.index), proximal_mu=mu,
        possible=possible, annotated=annotated, private=private.dpsgd() if private else None,
    )
    if private is not None:
        private.spend(stats.steps)
    metrics = {
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-steps": stats.steps,
        "sample-gradients": stats.examples,
        **label_metrics(cfg, site.train, pseudo),
        wire.LAYERS_RESTORED: r.layers_restored,
        **(private.metrics() if private else {}),
        # FedAvg weight: the examples that taught something (at least 1, so a round of
        # only unlabelled hospitals still averages)
        wire.WEIGHT: max(1, informative_examples(len(site.train.y), possible, annotated)),
    }
    shared = _shared_arrays(cfg, r.model.cpu(), context)
    t = cfg.train
    r.ledger.record("train", r.server_round, {
        "received_sha256": received,
        "settings": {"local_epochs": t.local_epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": t.lr, "steps": stats.steps, "proximal_mu": mu},
        "privacy": _privacy_entry(cfg, private, stats.steps),
        "metrics": dict(wire.metric_record(metrics)),
        "update_sha256": arrays_digest(shared),
    })
    return wire.reply(msg, site.name, r.ledger.checkpoint(), **{wire.METRICS: wire.metric_record(metrics), wire.ARRAYS: shared})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    r = _receive(msg, context)
    result = evaluate_model(r.model, r.site.test.x, r.site.test.y, r.cfg.train.device)
    metrics = {
        "eval-loss": result["loss"],
        wire.EVAL_ACCURACY: result["accuracy"],
        wire.EVAL_MACRO_F1: result["macro_f1"],
        wire.EVAL_CONFUSION: result["confusion"],
        wire.WEIGHT: len(r.site.test),
    }
    r.ledger.record("evaluate", r.server_round, {"received_sha256": arrays_digest(msg.content[wire.ARRAYS]), "metrics": dict(wire.metric_record(metrics))})
    return wire.reply(msg, r.site.name, r.ledger.checkpoint(), **{wire.METRICS: wire.metric_record(metrics)})
