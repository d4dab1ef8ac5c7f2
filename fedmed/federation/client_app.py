"""The hospital's ClientApp: the same object runs in simulation and on a real SuperNode.

The server sends the global model and the run config; the hospital trains or
evaluates on its own data and returns weights plus aggregate metrics. Nothing
about individual images (names, paths, pixels, per-image losses) leaves.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedmed.config import FedmedConfig, TrainConfig
from fedmed.data.sites import SiteData, site_data
from fedmed.errors import FedmedError, os_error_line
from fedmed.federation import attack, policy, wire
from fedmed.ledger.budget import BudgetLedgerError, LifetimeBudget, Spend
from fedmed.ledger.digests import architecture_digest, arrays_digest
from fedmed.ledger.hospital import HospitalLedger
from fedmed.models import build_model, kept_at_hospitals, load_layers, save_layers
from fedmed.privacy import canaries
from fedmed.seeds import derive_seed
from fedmed.training import personal, scaffold
from fedmed.training.loop import evaluate as evaluate_model
from fedmed.training.loop import train as train_model
from fedmed.training.partial import informative_examples, known_labels, label_metrics

if TYPE_CHECKING:
    from fedmed.privacy.hospital import HospitalPrivacy

app = ClientApp()
PERSONAL_STREAM = 3  # the seed stream of personal models' batches


def _file_errors_stay_here(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A file-system error at the hospital (its disk full while writing its ledger) reaches
    the server as one line without this machine's paths; the whole of it stays in the
    hospital's own log."""

    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except OSError as exc:
            print(f"fedmed: {os_error_line(exc)}", file=sys.stderr)
            reason = "its disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"a file-system error ({exc.strerror or type(exc).__name__})"
            raise FedmedError(f"this hospital cannot write its files: {reason} (the details are in the hospital's own log)") from None

    return handle


@dataclass(frozen=True)
class Request:
    """What a request brings to this hospital, unpacked once."""

    cfg: FedmedConfig  # the round's settings, from the server
    own: FedmedConfig | None  # a real hospital's own site config; None when simulated
    server_round: int
    site: SiteData  # this hospital's data (with the audit's canaries, if any)
    model: nn.Module  # the global model (with FedBN, FedPer: this hospital's own layers put back)
    received: dict[str, torch.Tensor]  # the global model as received
    layers_restored: int  # FedBN, FedPer: how many arrays were put back
    ledger: HospitalLedger  # the server's checkpoint already recorded in it
    budget: float  # the epsilon the server lets this hospital spend in the run (0: no limit)
    train: TrainConfig  # the training settings, at this round's learning rate (`train.schedule`)


def hospital_data(cfg: FedmedConfig, own: FedmedConfig | None, index: int) -> tuple[SiteData, canaries.Canaries | None]:
    """A hospital's data as it trains on it (and commits to it in its ledger): a real
    node's own (`own`, its site config), or simulated hospital `index`'s share, with the
    audit's canaries where the run has them. The audit reloads it the same way."""
    if own is None:
        site = site_data(cfg, index)
        added = _canaries(cfg, site)
        return (site if added is None else canaries.add_to(site, added)), added
    site = site_data(policy.hospital_config(cfg, own), 0)
    # Its own name, and a stream of its own for batches and noise: every real node's data is index 0.
    stream = int.from_bytes(hashlib.sha256(own.site.name.encode()).digest()[:4], "big")
    return replace(site, name=own.site.name, index=stream), None


def _site(context: Context, config: ConfigRecord, cfg: FedmedConfig, own: FedmedConfig | None) -> tuple[SiteData, canaries.Canaries | None]:
    """This node's hospital: a real node's own data (its site config); or the simulated
    hospital the request names (any simulated node plays any hospital), else the node's
    own `partition-id` (an enrolled node on simulated data, as the tests run one)."""
    index = config.get(wire.HOSPITAL, context.node_config.get(wire.PARTITION_ID))
    if own is None and index is None:
        raise FedmedError(f"this node has no `{wire.SITE_CONFIG}` or `{wire.PARTITION_ID}` in its node config, and the request names no simulated hospital: it cannot find its data")
    if own is not None:
        policy.hospital_config(cfg, own)  # settings that do not match: the server may learn which (raised outside the private part)
    try:
        return hospital_data(cfg, own, 0 if own is not None else int(index))
    except Exception as exc:  # noqa: BLE001
        # The reason may name files on this machine; it stays in this node's log, and the
        # server (which sees this exception's text) learns only that the data failed.
        print(f"fedmed: this hospital's data cannot be used: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise FedmedError("this hospital's data cannot be used (the reason is in the hospital's own log)") from None


def _canaries(cfg: FedmedConfig, site: SiteData) -> canaries.Canaries | None:
    """Simulated hospitals only: a real hospital never trains on images it did not see."""
    if not cfg.privacy.canaries or site.index != canaries.CANARY_HOSPITAL:
        return None
    return canaries.make(canaries.seed_for(cfg.seed), cfg.privacy.canaries, cfg.data.image_size, cfg.data.num_classes)


def _ledger(context: Context, config: ConfigRecord, site: str) -> HospitalLedger:
    """The node's own ledger folder (`ledger-dir`) if it has one; otherwise the folder the
    server names (a simulation's run directory: simulated hospitals share the researcher's disk)."""
    if wire.LEDGER_RUN not in config:
        raise FedmedError("the server sent no ledger run id: it runs an older fedmed; upgrade the server")
    own = context.node_config.get(wire.LEDGER_DIR)
    root = own or config.get(wire.LEDGER_ROOT)
    if not root:
        raise FedmedError(f"this node has no `{wire.LEDGER_DIR}` in its node config: set one for its training ledgers")
    keys = None if own or wire.LEDGER_KEYS not in config else Path(str(config[wire.LEDGER_KEYS]))  # a real node's keys are its own
    try:
        return HospitalLedger.open(Path(str(root)).expanduser(), str(config[wire.LEDGER_RUN]), site, keys)
    except FedmedError as exc:  # it may name this machine's files: the server learns only that it failed
        print(f"fedmed: this hospital's ledger cannot be used: {exc}", file=sys.stderr)
        raise FedmedError("this hospital's ledger, its key or its data secret cannot be used (the reason is in the hospital's own log)") from None


def _receive(msg: Message, context: Context) -> Request:
    config = msg.content[wire.CONFIG]
    cfg = wire.config_from_record(config)
    own = policy.site_settings(dict(context.node_config))
    if own is not None:
        policy.check_name(own, config.get(wire.ENROLLED_AS))
    server_round = int(config[wire.SERVER_ROUND])
    site, added = _site(context, config, cfg, own)
    model = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    ledger = _ledger(context, config, site.name)
    ledger.begin(cfg, server_round, model, site, added, wire.server_checkpoint(config))
    received = msg.content[wire.ARRAYS].to_torch_state_dict()
    model.load_state_dict(received)
    restored = 0
    if kept_at_hospitals(cfg, model):
        kept = load_layers(_own_file(ledger, site.name, _keeper(cfg)))
        if kept is not None:
            model.load_state_dict(kept, strict=False)
            restored = len(kept)
    budget = float(config[wire.BUDGET]) if own is not None and wire.BUDGET in config else cfg.privacy.budget_for(site.name)
    lr = float(config.get(wire.LR, cfg.train.lr))
    return Request(cfg, own, server_round, site, model, received, restored, ledger, budget, cfg.train.model_copy(update={"lr": lr}))


def _keeper(cfg: FedmedConfig) -> str:
    return "fedbn" if cfg.federation.strategy == "fedbn" else cfg.personal.method


def _own_file(ledger: HospitalLedger, site: str, what: str) -> Path:
    """This hospital's own state for the run (FedBN's or FedPer's layers, Ditto's personal
    model, SCAFFOLD's control variate), in its folder for the run: it outlives the node's
    process and a restart of the server, and never leaves the hospital."""
    return ledger.folder / f"{site}.{what}.pt"


def _shared_arrays(r: Request) -> ArrayRecord:
    """What goes back to the server; FedBN and FedPer keep their layers at the hospital
    for the next round."""
    state = r.model.cpu().state_dict()
    kept = kept_at_hospitals(r.cfg, r.model)
    if not kept:
        return ArrayRecord(state)
    save_layers(_own_file(r.ledger, r.site.name, _keeper(r.cfg)), {k: v for k, v in state.items() if k in kept})
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
        **({"lifetime_epsilon": private.lifetime_epsilon(), "lifetime_cap": private.lifetime_cap, "lifetime_delta": private.lifetime_delta} if private.lifetime is not None else {}),
    }


def _hospital_privacy(r: Request) -> tuple[HospitalPrivacy | None, LifetimeBudget | None]:
    """This hospital's DP-SGD plan and what it has spent so far, in this run and (a real
    hospital) on its data over all runs. Sample-level DP only: Opacus takes a second to
    import, so only then. BudgetLedgerError if the lifetime budget does not verify."""
    if r.cfg.privacy.mode != "sample":
        return None, None
    from fedmed.privacy.hospital import HospitalPrivacy

    n, spent = len(r.site.train.y), r.ledger.privacy_spent()
    if r.own is None:  # simulated: the run's budget only
        return HospitalPrivacy.load(r.cfg, n, spent, r.budget), None
    lifetime = r.ledger.lifetime(n)
    return HospitalPrivacy.load(r.cfg, n, spent, r.budget, lifetime.history(), r.own.site.max_epsilon, lifetime.dataset.delta), lifetime


def _decline(msg: Message, r: Request, private: HospitalPrivacy | None, received: str, reason: str, evaluated: dict[str, Any]) -> Message:
    print(f"fedmed: {r.site.name} declines round {r.server_round}: {reason}", file=sys.stderr)
    r.ledger.record("declined", r.server_round, {"received_sha256": received, "reason": reason, "privacy": _privacy_entry(r.cfg, private, 0)})
    refusal = ConfigRecord({"reason": reason, **(private.metrics() if private else {})})  # nothing about patients
    return wire.reply(msg, r.site.name, r.ledger.checkpoint(), **{wire.DECLINED: refusal}, **evaluated)


def _evaluation(r: Request, received: str, model_round: int) -> dict[str, Any]:
    """The model as received, on this hospital's own test split (recorded in its ledger
    as round `model_round`'s evaluation): aggregate figures only. With personalisation,
    its personal model's figures beside them."""
    model = _global_model(r)
    result = evaluate_model(model, r.site.test.x, r.site.test.y, r.cfg.train.device)
    metrics = {
        "eval-loss": result["loss"],
        wire.EVAL_ACCURACY: result["accuracy"],
        wire.EVAL_MACRO_F1: result["macro_f1"],
        wire.EVAL_CONFUSION: result["confusion"],
        wire.WEIGHT: len(r.site.test),
    }
    if r.cfg.data.val_fraction:  # for choosing settings; a hospital too small to hold any back adds nothing
        if r.site.val is not None:
            held = evaluate_model(model, r.site.val.x, r.site.val.y, r.cfg.train.device)
            metrics.update({wire.VAL_ACCURACY: held["accuracy"], wire.VAL_CONFUSION: held["confusion"]})
        else:
            metrics[wire.VAL_CONFUSION] = [[0] * r.cfg.data.num_classes for _ in range(r.cfg.data.num_classes)]
    own = _personal_model(r, model_round)
    if own is not None:
        mine = evaluate_model(own, r.site.test.x, r.site.test.y, r.cfg.train.device)
        metrics.update({wire.PERSONAL_ACCURACY: mine["accuracy"], wire.PERSONAL_MACRO_F1: mine["macro_f1"]})
    r.ledger.record("evaluate", model_round, {"received_sha256": received, "metrics": dict(wire.metric_record(metrics))})
    return metrics


def _global_model(r: Request) -> nn.Module:
    """What the hospital evaluates as the global model: as received (FedBN: with its own
    normalisation layers, without which BatchNorm is meaningless)."""
    if r.cfg.personal.method != "fedper" or not r.layers_restored:
        return r.model
    model = build_model(r.cfg.model, r.cfg.data.num_classes, seed=r.cfg.seed)
    model.load_state_dict(r.received)
    return model


def _personal_model(r: Request, model_round: int) -> nn.Module | None:
    """This hospital's own model, where the run personalises: FedPer's (the global body,
    its own head), Ditto's (kept at the hospital; none before it first trains), or the
    global model of the last round fine-tuned on its data."""
    method = r.cfg.personal.method
    if method == "fedper":
        return r.model
    if method == "ditto":
        kept = _own_state(r, "ditto", model_round + 1)  # as it stood once round `model_round` trained
        if kept is None:
            return None
        model = build_model(r.cfg.model, r.cfg.data.num_classes, seed=r.cfg.seed)
        model.load_state_dict(kept)
        return model
    if method == "finetune" and model_round == r.cfg.federation.rounds:
        return personal.finetune(r.model, r.site.train.x, r.site.train.y, r.train, r.cfg.personal.epochs, derive_seed(r.cfg.seed, model_round, r.site.index, PERSONAL_STREAM))
    return None


@app.train()
@_file_errors_stay_here
def train(msg: Message, context: Context) -> Message:
    r = _receive(msg, context)
    cfg, site = r.cfg, r.site
    received = arrays_digest(msg.content[wire.ARRAYS])
    evaluated = {}
    if msg.content[wire.CONFIG].get(wire.EVALUATE_FIRST):  # the previous round's model, before it changes here
        evaluated[wire.EVALUATION] = ConfigRecord(dict(wire.metric_record(_evaluation(r, received, r.server_round - 1))))
    try:
        private, lifetime = _hospital_privacy(r)
    except BudgetLedgerError as exc:  # never train on a budget that cannot be read: it would start from zero
        print(f"fedmed: {exc}", file=sys.stderr)
        return _decline(msg, r, None, received, "this hospital's lifetime privacy budget does not verify (the reason is in its own log)", evaluated)
    reason = None
    if r.own is not None:
        reason = policy.refusal(r.own, cfg, r.server_round, architecture_digest(r.model), private.plan.sigma if private else None)
    reason = reason or (private.refusal() if private else None)
    if reason:
        return _decline(msg, r, private, received, reason, evaluated)
    mu = cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0
    possible, annotated, pseudo = known_labels(cfg, r.model, site.train)
    attacking = r.own is None and site.name in attack.attackers(cfg)  # simulated hospitals only
    labels = attack.flip_labels(site.train.y, cfg.data.num_classes) if attacking and cfg.attack.kind == "label_flip" else site.train.y
    controls = _controls(msg, r) if cfg.federation.strategy == "scaffold" else None
    stats = train_model(
        r.model, site.train.x, labels, r.train, seed=derive_seed(cfg.seed, r.server_round, site.index), proximal_mu=mu,
        possible=possible, annotated=annotated, private=private.dpsgd() if private else None,
        correction=scaffold.correction(r.model, *controls) if controls is not None else None,
    )
    extra: dict[str, Any] = {}
    if controls is not None:
        own, change = scaffold.step(r.model, r.received, *controls, stats.steps, r.train.lr)
        _keep_own(r, "scaffold", controls[1], own)
        extra[wire.CONTROL] = ArrayRecord(change)
    if cfg.personal.method == "ditto":
        _ditto(r)
    if attacking:  # what it sends; the layers it keeps (FedBN, FedPer) stay as trained
        kept = kept_at_hospitals(cfg, r.model)
        sent = {k: v for k, v in r.model.cpu().state_dict().items() if k not in kept}
        r.model.load_state_dict(attack.tamper(cfg.attack, r.received, sent, attack.noise_seed(cfg, r.server_round, site.index)), strict=False)
    spent_entry = {}
    if private is not None:
        private.spend(stats.steps)
        if lifetime is not None:
            p = private.plan
            spent_entry["lifetime_checkpoint"] = lifetime.spend(Spend(r.ledger.writer.run_id, r.server_round, p.sigma, p.rate, stats.steps))
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
    shared = _shared_arrays(r)
    t = cfg.train
    r.ledger.record("train", r.server_round, {
        "received_sha256": received,
        "settings": {"local_epochs": t.local_epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": r.train.lr, "steps": stats.steps, "proximal_mu": mu},
        "privacy": {**_privacy_entry(cfg, private, stats.steps), **spent_entry},
        "metrics": dict(wire.metric_record(metrics)),
        "update_sha256": arrays_digest(shared),
        **({"control_sha256": arrays_digest(extra[wire.CONTROL])} if wire.CONTROL in extra else {}),
        **({"attack": cfg.attack.kind} if attacking else {}),  # a simulated attacker says so in its own ledger
    })
    return wire.reply(msg, site.name, r.ledger.checkpoint(), **{wire.METRICS: wire.metric_record(metrics), wire.ARRAYS: shared}, **evaluated, **extra)


def _controls(msg: Message, r: Request) -> tuple[scaffold.Variate, scaffold.Variate]:
    """SCAFFOLD: the server's control variate from the request, and this hospital's own."""
    server = msg.content[wire.CONTROL].to_torch_state_dict() if wire.CONTROL in msg.content else {}
    return server, _own_state(r, "scaffold", r.server_round) or {}


def _ditto(r: Request) -> None:
    """Ditto's personal model: this round's step towards the global model received, kept
    at the hospital (started from the global model the first time)."""
    before = _own_state(r, "ditto", r.server_round)
    model = build_model(r.cfg.model, r.cfg.data.num_classes, seed=r.cfg.seed)
    model.load_state_dict(before or r.received)
    p = r.cfg.personal
    personal.ditto(model, r.received, r.site.train.x, r.site.train.y, r.train, p.epochs, p.ditto_lambda, derive_seed(r.cfg.seed, r.server_round, r.site.index, PERSONAL_STREAM))
    _keep_own(r, "ditto", before, model.cpu().state_dict())


def _own_state(r: Request, what: str, before_round: int) -> dict[str, torch.Tensor] | None:
    """This hospital's own state (SCAFFOLD's variate, Ditto's model) as it stood before
    round `before_round` trained: a round done again after the server resumed from its
    checkpoint starts from what the hospital had before that round, not after."""
    saved = load_layers(_own_file(r.ledger, r.site.name, what))
    if saved is None:
        return None
    state = saved["before"] if saved["round"] >= before_round else saved["after"]
    return state or None


def _keep_own(r: Request, what: str, before: dict[str, torch.Tensor] | None, after: dict[str, torch.Tensor]) -> None:
    """The state before and after this round, so a round done again starts from the first."""
    save_layers(_own_file(r.ledger, r.site.name, what), {"round": r.server_round, "before": before or {}, "after": after})


@app.evaluate()
@_file_errors_stay_here
def evaluate(msg: Message, context: Context) -> Message:
    r = _receive(msg, context)
    metrics = _evaluation(r, arrays_digest(msg.content[wire.ARRAYS]), r.server_round)
    return wire.reply(msg, r.site.name, r.ledger.checkpoint(), **{wire.METRICS: wire.metric_record(metrics)})
