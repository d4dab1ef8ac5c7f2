"""The server's strategy: the configured aggregation (`aggregation.FLOWER`) under fedmed's
recording, which asks the hospitals drawn from the seed, aggregates in a fixed order and
types every reply into the run's log (`fedmed.run.record.RunLog`) and the server's ledger."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmed.config import FedmedConfig
from fedmed.errors import FedmedError
from fedmed.federation import aggregation, sampling, wire
from fedmed.ledger.digests import arrays_digest
from fedmed.ledger.server import ServerLedger
from fedmed.privacy.client_level import ClientLevelDP
from fedmed.run.record import NO_REPLY, Decline, Evaluation, RunLog, Update
from fedmed.training.schedule import lr_at


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Sample-weighted mean of scalars; lists are counts (confusion matrices) and are summed;
    privacy figures (`dp-*`) take the maximum."""
    return pool([next(iter(r.metric_records.values())) for r in records], weighted_by_key)


def pool(metrics: list[Mapping[str, Any]], weighted_by_key: str) -> MetricRecord:
    """The figures every hospital reported, pooled (one that only some report, such as a
    personal model's before every hospital has one, is left out)."""
    weights = np.array([float(m[weighted_by_key]) for m in metrics])
    weights = weights / weights.sum()
    out: dict[str, Any] = {weighted_by_key: int(sum(int(m[weighted_by_key]) for m in metrics))}
    for key in metrics[0]:
        if key == weighted_by_key or any(key not in m for m in metrics):
            continue
        if isinstance(metrics[0][key], list):
            out[key] = np.sum([np.asarray(m[key]) for m in metrics], axis=0).tolist()
        elif key.startswith("dp-"):  # privacy spent: the worst hospital's, not a mean
            out[key] = max(float(m[key]) for m in metrics)
        else:
            out[key] = float(np.dot(weights, [float(m[key]) for m in metrics]))
    return MetricRecord(out)


def _last_line(reason: str) -> str:
    """A remote error's last line (its message), not the traceback above it."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def _order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by hospital, so float sums (and results) do not depend on arrival order."""
    replies = list(replies)
    ok = sorted((m for m in replies if not m.has_error()), key=lambda m: wire.site_name(m.content))
    return ok + [m for m in replies if m.has_error()]


class _Listing:
    """A Grid that lists only the given nodes (the hospitals a round asks)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class Recording:
    """Mixed into a Flower strategy: asks the hospitals drawn from the run seed and the
    round (`sampling`), sends each round's learning rate (`train.schedule`), aggregates
    in hospital order, types every reply into the run's log, (FedBN, FedPer) leaves the
    global model's `hospital_layers` as they were (hospitals never send them), and stops
    asking a hospital to train once it has declined (its privacy budget is spent)."""

    def __init__(
        self, cfg: FedmedConfig, *, hospital_layers: frozenset[str] = frozenset(), ledger: ServerLedger | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)  # evaluations are pooled by `aggregate_evaluate`
        super().__init__(weighted_by_key=wire.WEIGHT, **kwargs)
        self.cfg = cfg
        self.hospital_layers = hospital_layers
        self.ledger = ledger
        self.seed = cfg.seed
        self.log = RunLog()
        self.enrolled: dict[int, str] = {}  # node id -> hospital in a deployment: the operator's enrolment, the only names it takes
        self.budgets: dict[str, float] = {}  # in a deployment: the epsilon each enrolled hospital may spend in this run
        self.hospitals: list[str] = []  # a simulation's hospitals, in index order
        self.seats: list[int] = []  # a simulation's nodes (`sampling.seats`): each plays whichever hospital a request names
        self.declined: set[str] = set()  # hospitals that declined to train: not asked again
        self.all_declined = False
        self.sent: ArrayRecord | None = None
        self.sent_eval: ArrayRecord | None = None
        # One message per round: each training request also asks for an evaluation of the
        # model it carries (the previous round's), and hospitals not asked to train are
        # asked to evaluate alongside (set by the ServerApp where every hospital trains and evaluates).
        self.evaluate_with_training = False
        self.asked: list[Message] = []  # this round's training requests (their ids are set once sent)
        self.requests: list[tuple[Message, str]] = []  # the current exchange's requests and the hospital each asks
        self.min_connected = self.min_available_nodes  # hospitals that must be connected for a round to start

    STATE = ("log", "declined", "all_declined")

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run aggregates as if it never stopped: the
        run's log, and the aggregation's own state (server optimiser moments, FedAvgM's
        momentum, SCAFFOLD's control variate)."""
        return {**{key: getattr(self, key) for key in self.STATE}, "aggregation": aggregation.get_state(self)}  # type: ignore[arg-type]

    def restore(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - {*self.STATE, "aggregation"})
        if unknown:  # an older fedmed's checkpoint (hospitals kept by node id): it would ask them again
            raise FedmedError(f"this run's checkpoint was written by an older fedmed ({', '.join(unknown)}): start the run again")
        for key in self.STATE:
            setattr(self, key, state[key])
        aggregation.set_state(self, state.get("aggregation", {}))  # type: ignore[arg-type]

    def _asked_as(self) -> dict[str, str]:
        """Request id -> the hospital it asks (ids are set once the requests are sent)."""
        return {m.metadata.message_id: site for m, site in self.requests}

    def _hospital(self, reply: Message, asked_as: dict[str, str]) -> tuple[str, str | None]:
        """The hospital a reply is recorded under (the one its request asked, never the
        reply's own say), and why it is refused, if it is: a reply under another name."""
        site = asked_as.get(reply.metadata.reply_to_message_id)
        if site is None:  # cannot happen: Flower delivers replies to this run's requests only
            return f"node {reply.metadata.src_node_id}", "a reply to no request of this round"
        claimed = wire.site_name(reply.content)
        if claimed == site:
            return site, None
        return site, f"{wire.NAME_MISMATCH if self.enrolled else wire.OTHER_NAME} (the reply says {claimed!r})"

    def _with_ledger(self, config: ConfigRecord) -> ConfigRecord:
        """Every request carries the ledger run id and the server ledger's latest signed
        checkpoint; a simulated hospital's, where to keep its ledger (the run directory's:
        and key store's: a real node keeps its own, and is sent no path)."""
        if self.ledger is None:
            return config
        entries = {wire.LEDGER_RUN: self.ledger.run_id, wire.LEDGER_CHECKPOINT: json.dumps(self.ledger.checkpoint(), sort_keys=True)}
        if not self.enrolled:
            entries[wire.LEDGER_ROOT] = str(self.ledger.root)
            entries[wire.LEDGER_KEYS] = str(self.ledger.keys.root)
        return ConfigRecord({**dict(config), **entries})

    def _available(self, grid: Grid) -> list[str]:
        """The hospitals that can be asked: a deployment's connected ones, once enough are
        (it waits for them); every simulated one."""
        if not self.enrolled:
            return list(self.hospitals)
        return sorted(sampling.connected(grid, self.enrolled, self.min_connected).values())

    def _ask(self, grid: Grid, sites: list[str], configure: Any, start: int = 0) -> list[Message]:
        """Flower's request (FedProx adds its mu to the config) for each of `sites`, on its
        node, telling it who it is: a real node the name its key is enrolled under and its
        own budget for the run (never another hospital's); a simulated node the hospital
        it plays (its data). Simulated hospitals take the seats in turn, from `start`, in
        index order: with every hospital asked, seat i (partition i) plays hospital i."""
        if not sites:
            return []
        if self.enrolled:
            node_of = {site: node for node, site in self.enrolled.items()}
            placed = [(node_of[site], site, {wire.ENROLLED_AS: site, wire.BUDGET: self.budgets.get(site, 0.0)}) for site in sites]
        else:
            if self.ledger is not None:
                self.ledger.admit(sites)  # their keys, before they first sign
            index = {site: i for i, site in enumerate(self.hospitals)}
            ordered = sorted(sites, key=index.__getitem__)
            placed = [(self.seats[(start + k) % len(self.seats)], site, {wire.HOSPITAL: index[site]}) for k, site in enumerate(ordered)]
        saved = self.fraction_train, self.fraction_evaluate, self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes
        self.fraction_train = self.fraction_evaluate = 1.0
        self.min_train_nodes = self.min_evaluate_nodes = self.min_available_nodes = 1
        try:
            (template,) = configure(_Listing(grid, [placed[0][0]]))
        finally:
            self.fraction_train, self.fraction_evaluate, self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes = saved
        out = []
        for node, site, told in placed:
            content = RecordDict(dict(template.content))
            content[wire.CONFIG] = ConfigRecord({**dict(template.content[wire.CONFIG]), **told})
            message = Message(content, node, template.metadata.message_type, group_id=template.metadata.group_id)
            self.requests.append((message, site))
            out.append(message)
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), wire.LR: lr_at(self.cfg.train, server_round, self.cfg.federation.rounds)})
        if self.evaluate_with_training and server_round > 1:
            config = ConfigRecord({**dict(config), wire.EVALUATE_FIRST: True})
        self.sent = arrays
        config = self._with_ledger(config)
        self.requests = []
        candidates = [site for site in self._available(grid) if site not in self.declined]
        self.all_declined = not candidates  # every hospital has declined for good
        chosen = sampling.draw(candidates, self.fraction_train, self.seed, server_round, sampling.TRAIN) if candidates else []
        self.asked = self._ask(grid, chosen, lambda g: super(Recording, self).configure_train(server_round, arrays, config, g))
        self.log.round(server_round).asked = sorted(chosen)
        return self.asked

    def _aggregate(self, server_round: int, taken: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The configured rule (Flower's strategy, or SCAFFOLD) on the replies in hospital
        order; the layers hospitals keep (FedBN, FedPer) stay as they were sent."""
        arrays, metrics = super().aggregate_train(server_round, taken)  # type: ignore[misc]
        if arrays is not None and self.hospital_layers and self.sent is not None:
            arrays = ArrayRecord({k: (self.sent[k] if k in self.hospital_layers else arrays[k]) for k in self.sent})
        return arrays, metrics

    def _privacy(self) -> dict[str, Any] | None:
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Type every reply into the round's outcome (an update, a refusal, or a dropout),
        then aggregate the updates in hospital order."""
        outcome = self.log.round(server_round)
        replies = list(replies)
        # The hospital each reply answers for is the one its request asked: the SuperLink
        # itself signs the errors it makes for a node that went away.
        asked_as = {m.metadata.message_id: site for m, site in self.requests if m.metadata.message_type == MessageType.TRAIN}
        answered = {m.metadata.reply_to_message_id for m in replies}
        for message_id, site in asked_as.items():
            if message_id not in answered:
                outcome.dropped[site] = NO_REPLY
        taken: list[Message] = []  # what the algorithm aggregates (errors included: it skips them)
        updates: dict[str, ArrayRecord] = {}
        controls: dict[str, ArrayRecord] = {}
        for msg in _order(replies):
            if msg.has_error():
                outcome.dropped[asked_as.get(msg.metadata.reply_to_message_id, f"node {msg.metadata.src_node_id}")] = _last_line(msg.error.reason)
                taken.append(msg)
                continue
            site, refused = self._hospital(msg, asked_as)
            if refused:
                outcome.dropped[site] = refused
                continue
            checkpoint = wire.ledger_checkpoint(msg.content)
            if self.cfg.federation.strategy == "scaffold" and wire.DECLINED not in msg.content and wire.CONTROL not in msg.content:
                outcome.dropped[site] = "a SCAFFOLD update without its control variate change"
                continue
            if wire.DECLINED in msg.content:
                refusal = dict(msg.content[wire.DECLINED])
                outcome.declined[site] = Decline(str(refusal.pop("reason")), refusal, checkpoint)
                self.declined.add(site)
                continue
            metrics = wire.metrics_of(msg.content)
            updates[site] = ArrayRecord(dict(msg.content[wire.ARRAYS]))  # a copy: Flower's median pops the reply's arrays
            if wire.CONTROL in msg.content:
                controls[site] = ArrayRecord(dict(msg.content[wire.CONTROL]))
            outcome.trained[site] = Update(metrics, int(metrics[wire.WEIGHT]), arrays_digest(updates[site]), checkpoint, arrays_digest(controls[site]) if site in controls else None)
            taken.append(msg)
        before = aggregation.get_state(self)  # type: ignore[arg-type]
        picked = aggregation.selected(self.cfg, [m.content for m in taken if not m.has_error()])
        arrays, metrics = self._aggregate(server_round, taken)
        if picked is not None:
            outcome.selected = [sorted(outcome.trained)[i] for i in picked]
        if self.ledger is not None and self.sent is not None:
            self.ledger.train_round(outcome, self.sent, updates, arrays, self._privacy(), controls, before)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent_eval = arrays
        self.requests = []
        chosen = sampling.draw(self._available(grid), self.fraction_evaluate, self.seed, server_round, sampling.EVALUATE) if self.fraction_evaluate else []
        config = self._with_ledger(config)
        self.log.round(server_round).asked_to_evaluate = sorted(chosen)
        return self._ask(grid, chosen, lambda g: super(Recording, self).configure_evaluate(server_round, arrays, config, g))

    def evaluate_only(self, model_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        """With one message per round: evaluation requests, for the model this round's
        training requests carry (`self.sent`, round `model_round`'s), to the hospitals not
        asked to train (those that declined for good)."""
        assert self.sent is not None  # set by this round's configure_train
        self.sent_eval = self.sent
        training = {site for _, site in self.requests}
        others = [site for site in self._available(grid) if site not in training]
        config = self._with_ledger(ConfigRecord({**dict(config), wire.SERVER_ROUND: model_round}))
        content = RecordDict({wire.ARRAYS: self.sent, wire.CONFIG: config})
        self.log.round(model_round).asked_to_evaluate = sorted([*training, *others])
        return self._ask(grid, others, lambda g: [g.create_message(content, MessageType.EVALUATE, g.get_node_ids()[0], str(model_round))], start=len(training))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Type every evaluation of round `server_round`'s model (evaluation replies, and
        training replies that carry one) into its outcome; pool them; record them."""
        outcome = self.log.round(server_round)
        asked_as = self._asked_as()
        for msg in _order(replies):
            if msg.has_error():  # every message given here asked for an evaluation
                outcome.evaluation_failures += 1
                continue
            evaluated = msg.content[wire.EVALUATION] if wire.EVALUATION in msg.content else None
            site, refused = self._hospital(msg, asked_as)
            if refused or site in outcome.evaluated or (evaluated is None and msg.metadata.message_type == MessageType.TRAIN):
                outcome.evaluation_failures += 1
                continue
            outcome.evaluated[site] = Evaluation(dict(evaluated) if evaluated is not None else wire.metrics_of(msg.content), wire.ledger_checkpoint(msg.content))
        if self.ledger is not None and self.sent_eval is not None:
            self.ledger.evaluate_round(outcome, self.sent_eval)
        metrics = pool([e.metrics for _, e in sorted(outcome.evaluated.items())], wire.WEIGHT) if outcome.evaluated else None
        outcome.federated_eval = dict(metrics) if metrics is not None else {}
        return metrics


class RecordingDPFedAvg(Recording, FedAvg):
    """FedAvg with client-level DP: clipped, unweighted, noised (privacy.client_level)."""

    def __init__(self, cfg: FedmedConfig, *, client_dp: ClientLevelDP, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.client_dp = client_dp

    def _privacy(self) -> dict[str, Any] | None:
        return {"mode": "client", "accountant": self.client_dp.history.kind, **self.client_dp.metrics()}

    def _aggregate(self, server_round: int, taken: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [m for m in taken if not m.has_error()]
        if not ok or self.sent is None:
            return None, None
        start = {k: v.numpy() for k, v in self.sent.items()}
        updated = [{k: v.numpy() for k, v in m.content[wire.ARRAYS].items()} for m in ok]
        arrays = self.client_dp.aggregate(start, updated)
        metrics = self.train_metrics_aggr_fn([m.content for m in ok], self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics


def build_strategy(cfg: FedmedConfig, hospital_layers: set[str], client_dp: ClientLevelDP | None = None, **common: Any) -> Recording:
    """The configured algorithm under fedmed's recording; `hospital_layers` are the arrays
    the hospitals keep (FedBN's normalisation layers, FedPer's head); with `client_dp`,
    FedAvg becomes DP-FedAvg (FedProx's hospitals still read mu from the run config)."""
    kept = frozenset(hospital_layers)
    if client_dp is not None:
        return RecordingDPFedAvg(cfg, client_dp=client_dp, hospital_layers=kept, **common)
    base = aggregation.FLOWER[cfg.federation.strategy]
    cls = type(f"Recording{base.__name__}", (Recording, base), {})
    return cls(cfg, hospital_layers=kept, **aggregation.settings(cfg), **common)
