"""The hospital's ClientApp: the same object runs in simulation and on a real SuperNode.

The server sends the global model and the run config; the hospital trains or
evaluates on its own data and returns weights plus aggregate metrics. Nothing
about individual images (names, paths, pixels, per-image losses) leaves.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmed.audit import canaries as canary_mod
from fedmed.audit.digests import architecture_digest, arrays_digest
from fedmed.audit.hospital_side import REPLY_KEY, HospitalLedger
from fedmed.config import FedmedConfig
from fedmed.data.sites import SiteData, num_classes, site_data
from fedmed.deployment import policy
from fedmed.errors import FedmedError
from fedmed.federation.records import DECLINED_KEY, SITE_KEY, WEIGHT_KEY, config_from_record, metric_record
from fedmed.models import build_model, norm_keys
from fedmed.privacy.hospital import HospitalPrivacy
from fedmed.seeds import derive_seed
from fedmed.training.local import evaluate as evaluate_model
from fedmed.training.partial import informative_examples, known_labels, label_metrics
from fedmed.training.local import train as train_model

app = ClientApp()


def _site(context: Context, cfg: FedmedConfig, local: FedmedConfig | None) -> SiteData:
    """This node's hospital: a real node's own data (its site config), or a simulated
    hospital's share, `partition-id` in its node config (set by the simulation engine)."""
    if local is not None:
        index, data_cfg = 0, policy.hospital_config(cfg, local)
    elif "partition-id" in context.node_config:
        index, data_cfg = int(context.node_config["partition-id"]), cfg
    else:
        raise FedmedError(f"this node has neither `{policy.SITE_CONFIG}` nor `partition-id` in its node config: it cannot find its data")
    try:
        site = site_data(data_cfg, index)
    except Exception as exc:
        # The reason may name local files; it stays in this node's log, and the
        # server (which sees this exception's text) learns only that the data failed.
        print(f"fedmed: this hospital's data cannot be used: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise FedmedError("this hospital's data cannot be used (the reason is in the hospital's own log)") from None
    if local is None:
        return site
    # Its own name, and a stream of its own for batches and noise: every real node's data is index 0.
    stream = int.from_bytes(hashlib.sha256(local.site.name.encode()).digest()[:4], "big")
    return replace(site, name=local.site.name, index=stream)


LOCAL_STATE = "fedbn-local"  # in the node's context.state: this hospital's own normalisation layers


def _canaries(cfg: FedmedConfig, site: SiteData, real: bool) -> canary_mod.Canaries | None:
    """Simulated hospitals only: a real hospital never trains on images it did not see."""
    if real or not cfg.privacy.canaries or site.index != canary_mod.CANARY_HOSPITAL:
        return None
    return canary_mod.make(canary_mod.seed_for(cfg.seed), cfg.privacy.canaries, cfg.data.image_size, num_classes(cfg))


Received = tuple[FedmedConfig, FedmedConfig | None, int, SiteData, nn.Module, int, HospitalLedger]


def _receive(msg: Message, context: Context) -> Received:
    """The round's settings, a real node's own settings (None when simulated), this
    hospital's data (with the audit's canaries, if any), the global model (with FedBN,
    this hospital's own normalisation layers put back; the int says how many arrays)
    and this hospital's ledger, the server's checkpoint in it."""
    config = msg.content["config"]
    cfg = config_from_record(config)
    local = policy.site_settings(dict(context.node_config))
    server_round = int(config["server-round"])
    site = _site(context, cfg, local)
    canaries = _canaries(cfg, site, local is not None)
    if canaries is not None:
        site = canary_mod.add_to(site, canaries)
    model = build_model(cfg.model, num_classes(cfg), seed=cfg.seed)
    ledger = HospitalLedger.open(context, config, site.name)
    ledger.begin(cfg, server_round, config, model, site, canaries)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    restored = 0
    if cfg.federation.strategy == "fedbn" and LOCAL_STATE in context.state:
        kept = context.state[LOCAL_STATE].to_torch_state_dict()
        model.load_state_dict(kept, strict=False)
        restored = len(kept)
    return cfg, local, server_round, site, model, restored, ledger


def _shared_arrays(cfg: FedmedConfig, model: nn.Module, context: Context) -> ArrayRecord:
    """What goes back to the server; FedBN keeps the normalisation layers here, in the
    node's state, for the next round."""
    state = model.state_dict()
    if cfg.federation.strategy != "fedbn":
        return ArrayRecord(state)
    local = norm_keys(model)
    context.state[LOCAL_STATE] = ArrayRecord({k: v for k, v in state.items() if k in local})
    return ArrayRecord({k: v for k, v in state.items() if k not in local})


def _reply(msg: Message, site: SiteData, ledger: HospitalLedger, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": metric_record(metrics), SITE_KEY: ConfigRecord({"name": site.name}), REPLY_KEY: ledger.reply_record()})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _privacy_entry(cfg: FedmedConfig, private: HospitalPrivacy | None, steps: int) -> dict:
    """The DP settings a ledger records for one round (steps: this round's)."""
    if private is None:
        return {"mode": cfg.privacy.mode}
    p = private.plan
    return {
        "mode": "sample", "accountant": p.accountant, "sigma": p.sigma, "sample_rate": p.rate, "steps": steps,
        "max_grad_norm": p.max_grad_norm, "delta": p.delta, "secure_mode": False,
        "noise": "run seed" if p.reproducible else "system entropy",
        "epsilon": private.ledger.epsilon(p.delta), "budget": private.budget,
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, local, server_round, site, model, restored, ledger = _receive(msg, context)
    received = arrays_digest(msg.content["arrays"])
    private = None
    if cfg.privacy.mode == "sample":
        private = HospitalPrivacy.load(cfg, site.name, len(site.train.y), ledger.dp_spent(), local.site.max_epsilon if local else 0.0)
    reason = None
    if local is not None:
        reason = policy.refusal(local, cfg, server_round, architecture_digest(model), private.plan.sigma if private else None)
    reason = reason or (private.refusal() if private else None)
    if reason:
        print(f"fedmed: {site.name} declines round {server_round}: {reason}", file=sys.stderr)
        ledger.record("declined", server_round, {"received_sha256": received, "reason": reason, "privacy": _privacy_entry(cfg, private, 0)})
        refusal = ConfigRecord({"reason": reason, **(private.metrics() if private else {})})  # nothing about patients
        content = RecordDict({DECLINED_KEY: refusal, SITE_KEY: ConfigRecord({"name": site.name}), REPLY_KEY: ledger.reply_record()})
        return Message(content=content, reply_to=msg)
    mu = cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0
    seed = derive_seed(cfg.seed, server_round, site.index)
    possible, annotated, pseudo = known_labels(cfg, model, site.train)
    stats = train_model(
        model, site.train.x, site.train.y, cfg.train, seed=seed, proximal_mu=mu, possible=possible, annotated=annotated,
        private=private.plan if private else None,
    )
    if private is not None:
        private.spend(stats.steps)
    metrics = {
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-steps": stats.steps,
        "sample-gradients": stats.examples,
        **label_metrics(cfg, site.train, pseudo),
        "local-arrays-restored": restored,
        **(private.metrics() if private else {}),
        # FedAvg weight: the examples that taught something (at least 1, so a round of
        # only unlabelled hospitals still averages)
        WEIGHT_KEY: max(1, informative_examples(len(site.train.y), possible, annotated)),
    }
    shared = _shared_arrays(cfg, model.cpu(), context)
    t = cfg.train
    ledger.record("train", server_round, {
        "received_sha256": received,
        "settings": {"local_epochs": t.local_epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": t.lr, "steps": stats.steps, "proximal_mu": mu},
        "privacy": _privacy_entry(cfg, private, stats.steps),
        "metrics": dict(metric_record(metrics)),
        "update_sha256": arrays_digest(shared),
    })
    return _reply(msg, site, ledger, metrics, shared)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, server_round, site, model, _, ledger = _receive(msg, context)
    result = evaluate_model(model, site.test.x, site.test.y, cfg.train.device)
    metrics = {
        "eval-loss": result["loss"],
        "eval-accuracy": result["accuracy"],
        "eval-macro-f1": result["macro_f1"],
        "eval-confusion": result["confusion"],
        WEIGHT_KEY: len(site.test),
    }
    ledger.record("evaluate", server_round, {"received_sha256": arrays_digest(msg.content["arrays"]), "metrics": dict(metric_record(metrics))})
    return _reply(msg, site, ledger, metrics)
