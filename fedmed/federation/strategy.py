"""FedAvg that aggregates in a fixed order and remembers each hospital's metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

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


class RecordingFedAvg(FedAvg):
    """Message-API FedAvg plus a per-round, per-hospital log of the replies' metrics."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = _order(replies)
        self._record(server_round, "train", ordered)
        return super().aggregate_train(server_round, ordered)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ordered = _order(replies)
        self._record(server_round, "eval", ordered)
        metrics = super().aggregate_evaluate(server_round, ordered)
        if metrics is not None:
            self.federated_eval[server_round] = metrics
        return metrics
