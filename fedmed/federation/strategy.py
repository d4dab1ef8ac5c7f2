"""The aggregation strategies (FedAvg, FedProx, FedAdam, FedYogi, FedBN), each aggregating
in a fixed order and remembering each hospital's metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from fedmed.config import FederationConfig
from fedmed.federation.records import WEIGHT_KEY, site_name


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Sample-weighted mean of scalars; lists are counts (confusion matrices) and are summed."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([float(m[weighted_by_key]) for m in metrics])
    weights = weights / weights.sum()
    out: dict[str, Any] = {weighted_by_key: int(sum(int(m[weighted_by_key]) for m in metrics))}
    for key in metrics[0]:
        if key == weighted_by_key:
            continue
        if isinstance(metrics[0][key], list):
            out[key] = np.sum([np.asarray(m[key]) for m in metrics], axis=0).tolist()
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
    ok = sorted((m for m in replies if not m.has_error()), key=lambda m: site_name(m.content))
    return ok + [m for m in replies if m.has_error()]


class Recording:
    """Mixed into a Flower strategy: aggregates in hospital order, keeps a per-round,
    per-hospital log of the replies' metrics, and (FedBN) leaves the `keep_local`
    arrays of the global model as they were: hospitals never send them."""

    def __init__(self, *, keep_local: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        self.keep_local = keep_local
        self.sent: ArrayRecord | None = None
        self.per_site: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
        self.failures: dict[int, list[str]] = {}  # round -> training error reasons
        self.federated_eval: dict[int, MetricRecord] = {}  # round -> aggregated evaluation

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        sites = self.per_site.setdefault(server_round, {})
        for msg in replies:
            if msg.has_error():
                if phase == "train":
                    self.failures.setdefault(server_round, []).append(_last_line(msg.error.reason))
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            sites.setdefault(site_name(msg.content), {})[phase] = dict(metrics)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = _order(replies)
        self._record(server_round, "train", ordered)
        arrays, metrics = super().aggregate_train(server_round, ordered)
        if arrays is not None and self.keep_local and self.sent is not None:
            arrays = ArrayRecord({k: (self.sent[k] if k in self.keep_local else arrays[k]) for k in self.sent})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ordered = _order(replies)
        self._record(server_round, "eval", ordered)
        metrics = super().aggregate_evaluate(server_round, ordered)
        if metrics is not None:
            self.federated_eval[server_round] = metrics
        return metrics


class RecordingFedAvg(Recording, FedAvg):
    pass


class RecordingFedProx(Recording, FedProx):
    pass


class RecordingFedAdam(Recording, FedAdam):
    pass


class RecordingFedYogi(Recording, FedYogi):
    pass


def build_strategy(federation: FederationConfig, local_keys: set[str], **common: Any) -> Recording:
    """The configured algorithm; `local_keys` are the model's normalisation arrays (FedBN)."""
    name = federation.strategy
    if name == "fedprox":
        return RecordingFedProx(proximal_mu=federation.proximal_mu, **common)
    if name in ("fedadam", "fedyogi"):
        cls = RecordingFedAdam if name == "fedadam" else RecordingFedYogi
        return cls(eta=federation.server_lr, **common)
    keep = frozenset(local_keys) if name == "fedbn" else frozenset()
    return RecordingFedAvg(keep_local=keep, **common)
