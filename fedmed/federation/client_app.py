"""The hospital's ClientApp: the same object runs in simulation and on a real SuperNode.

The server sends the global model and the run config; the hospital trains or
evaluates on its own data and returns weights plus aggregate metrics. Nothing
about individual images (names, paths, pixels, per-image losses) leaves.
"""

from __future__ import annotations

import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmed.config import FedmedConfig
from fedmed.data.sites import SiteData, num_classes, site_data
from fedmed.errors import FedmedError
from fedmed.federation.records import DECLINED_KEY, SITE_KEY, WEIGHT_KEY, config_from_record, metric_record
from fedmed.models import build_model, norm_keys
from fedmed.privacy.hospital import HospitalPrivacy, policy_refusal
from fedmed.seeds import derive_seed
from fedmed.training.local import evaluate as evaluate_model
from fedmed.training.partial import informative_examples, known_labels, label_metrics
from fedmed.training.local import train as train_model

app = ClientApp()


def _site(context: Context, cfg: FedmedConfig) -> SiteData:
    """This node's hospital: `partition-id` in its node config (set by the simulation
    engine, or by `flower-supernode --node-config`)."""
    if "partition-id" not in context.node_config:
        raise FedmedError("this node has no `partition-id` in its node config: it cannot find its data")
    try:
        return site_data(cfg, int(context.node_config["partition-id"]))
    except Exception as exc:
        # The reason may name local files; it stays in this node's log, and the
        # server (which sees this exception's text) learns only that the data failed.
        print(f"fedmed: this hospital's data cannot be used: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise FedmedError("this hospital's data cannot be used (the reason is in the hospital's own log)") from None


LOCAL_STATE = "fedbn-local"  # in the node's context.state: this hospital's own normalisation layers


def _receive(msg: Message, context: Context) -> tuple[FedmedConfig, int, SiteData, nn.Module, int]:
    """The round's settings, this hospital's data, and the global model (with FedBN, this
    hospital's own normalisation layers put back; the int says how many arrays)."""
    config = msg.content["config"]
    cfg = config_from_record(config)
    site = _site(context, cfg)
    model = build_model(cfg.model, num_classes(cfg), seed=cfg.seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    restored = 0
    if cfg.federation.strategy == "fedbn" and LOCAL_STATE in context.state:
        local = context.state[LOCAL_STATE].to_torch_state_dict()
        model.load_state_dict(local, strict=False)
        restored = len(local)
    return cfg, int(config["server-round"]), site, model, restored


def _shared_arrays(cfg: FedmedConfig, model: nn.Module, context: Context) -> ArrayRecord:
    """What goes back to the server; FedBN keeps the normalisation layers here, in the
    node's state, for the next round."""
    state = model.state_dict()
    if cfg.federation.strategy != "fedbn":
        return ArrayRecord(state)
    local = norm_keys(model)
    context.state[LOCAL_STATE] = ArrayRecord({k: v for k, v in state.items() if k in local})
    return ArrayRecord({k: v for k, v in state.items() if k not in local})


def _reply(msg: Message, site: SiteData, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": metric_record(metrics), SITE_KEY: ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, server_round, site, model, restored = _receive(msg, context)
    private = HospitalPrivacy.load(cfg, context, site.name, len(site.train.y)) if cfg.privacy.mode == "sample" else None
    reason = policy_refusal(cfg, dict(context.node_config)) or (private.refusal() if private else None)
    if reason:
        print(f"fedmed: {site.name} declines round {server_round}: {reason}", file=sys.stderr)
        refusal = ConfigRecord({"reason": reason, **(private.metrics() if private else {})})  # nothing about patients
        content = RecordDict({DECLINED_KEY: refusal, SITE_KEY: ConfigRecord({"name": site.name})})
        return Message(content=content, reply_to=msg)
    mu = cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0
    seed = derive_seed(cfg.seed, server_round, site.index)
    possible, annotated, pseudo = known_labels(cfg, model, site.train)
    stats = train_model(
        model, site.train.x, site.train.y, cfg.train, seed=seed, proximal_mu=mu, possible=possible, annotated=annotated,
        private=private.plan if private else None,
    )
    if private is not None:
        private.spend(stats.steps, context)
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
    return _reply(msg, site, metrics, _shared_arrays(cfg, model.cpu(), context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, site, model, _ = _receive(msg, context)
    result = evaluate_model(model, site.test.x, site.test.y, cfg.train.device)
    metrics = {
        "eval-loss": result["loss"],
        "eval-accuracy": result["accuracy"],
        "eval-macro-f1": result["macro_f1"],
        "eval-confusion": result["confusion"],
        WEIGHT_KEY: len(site.test),
    }
    return _reply(msg, site, metrics)
