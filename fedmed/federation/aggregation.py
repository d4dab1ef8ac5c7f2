"""What each `federation.strategy` computes from a round's updates, as one Flower strategy
object: Flower's own (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgM, Krum,
Multi-Krum, Bulyan, FedMedian, FedTrimmedAvg) or fedmed's SCAFFOLD. The server's
strategy (`strategy.Recording`) runs on the same class; the audit replays a round with a
bare one (`replay`) from the saved updates and the server state logged before the round,
so both run the same code, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedmed.config import FedmedConfig, share
from fedmed.federation import wire


class Scaffold(FedAvg):
    """SCAFFOLD's server (Karimireddy et al. 2020, Algorithm 1). Each training request
    carries the server's control variate c (empty in round 1: zeros); each hospital i
    corrects its SGD steps by c - c_i, keeps its own c_i, and returns its model and the
    change of c_i. The server moves the model by `server_learning_rate` towards the
    FedAvg-weighted mean of the models (so with no correction it is FedAvg), and c by
    |S|/N times the mean change of the S hospitals that trained, N being all hospitals:
    the paper's step under partial participation."""

    def __init__(self, *, all_hospitals: int, server_learning_rate: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.all_hospitals = all_hospitals  # N
        self.server_learning_rate = server_learning_rate
        self.control: dict[str, np.ndarray] | None = None  # c, by the hospitals' parameter names
        self.current_arrays: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current_arrays = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content[wire.CONTROL] = ArrayRecord({k: Array(v) for k, v in (self.control or {}).items()})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = [m.content for m in replies if not m.has_error()]
        if not contents or self.current_arrays is None:
            return None, None
        models = [RecordDict({wire.ARRAYS: c[wire.ARRAYS], wire.METRICS: c[wire.METRICS]}) for c in contents]
        mean = aggregate_arrayrecords(models, self.weighted_by_key)
        x = self.current_arrays
        new = {k: np.asarray(x[k] + self.server_learning_rate * (mean[k].numpy() - x[k])).astype(x[k].dtype) for k in mean}
        changes = [{k: v.numpy() for k, v in c[wire.CONTROL].items()} for c in contents]
        step = len(contents) / self.all_hospitals
        control = dict(self.control or {})
        for key in changes[0]:
            mean_change = np.sum([d[key] for d in changes], axis=0) / len(changes)
            control[key] = np.asarray(control.get(key, np.zeros_like(mean_change)) + step * mean_change, dtype=mean_change.dtype)
        self.control = control
        return ArrayRecord({k: Array(v) for k, v in new.items()}), self.train_metrics_aggr_fn(models, self.weighted_by_key)


FLOWER: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedbn": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM, "scaffold": Scaffold, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan, "median": FedMedian,
    "trimmed_mean": FedTrimmedAvg,
}  # fmt: skip
NAMES = {
    "fedavg": "FedAvg", "fedbn": "FedBN", "fedprox": "FedProx", "fedadam": "FedAdam", "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad",
    "fedavgm": "FedAvgM", "scaffold": "SCAFFOLD", "krum": "Krum", "multikrum": "Multi-Krum", "bulyan": "Bulyan", "median": "FedMedian",
    "trimmed_mean": "FedTrimmedAvg",
}  # fmt: skip
SELECTING = ("krum", "multikrum", "bulyan")  # rules that keep some updates whole: the ledger names them
# The server state an aggregation carries from round to round (saved before each round's
# step with its updates, and in the checkpoint); a list is kept by position.
STATE = ("m_t", "v_t", "momentum_vector", "control")


def settings(cfg: FedmedConfig) -> dict[str, Any]:
    """The strategy's own parameters, from the config (validated there against the
    hospitals a round asks)."""
    f = cfg.federation
    name = f.strategy
    if name == "fedprox":
        return {"proximal_mu": f.proximal_mu}
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        return {"eta": f.server_step()}
    if name == "fedavgm":
        return {"server_learning_rate": f.server_step(), "server_momentum": f.server_momentum}
    if name == "scaffold":
        return {"server_learning_rate": f.server_step(), "all_hospitals": cfg.data.hospitals}
    if name in ("krum", "bulyan"):
        return {"num_malicious_nodes": f.byzantine}
    if name == "multikrum":
        return {"num_malicious_nodes": f.byzantine, "num_nodes_to_select": f.krum_select or share(cfg.data.hospitals, f.fraction_train) - f.byzantine}
    if name == "trimmed_mean":
        return {"beta": f.trim_fraction}
    return {}


def selected(cfg: FedmedConfig, contents: list[RecordDict]) -> list[int] | None:
    """Krum, Multi-Krum, Bulyan: the positions of the updates their rule keeps (Flower's
    `select_multikrum`, as their aggregation calls it); None for other rules."""
    f = cfg.federation
    if f.strategy not in SELECTING or not contents:
        return None
    if f.strategy == "bulyan":
        if len(contents) < 4 * f.byzantine + 3:  # Flower's Bulyan skips the round
            return []
        keep = len(contents) - 2 * f.byzantine
    else:
        keep = settings(cfg).get("num_nodes_to_select", 1)
    chosen = {id(c) for c in select_multikrum(contents, num_malicious_nodes=f.byzantine, num_nodes_to_select=keep)}
    return [i for i, c in enumerate(contents) if id(c) in chosen]


def get_state(strategy: FedAvg) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's carried state (`STATE`), as named arrays."""
    out = {}
    for attr in STATE:
        value = getattr(strategy, attr, None)
        if value:
            items = enumerate(value) if isinstance(value, list) else value.items()
            out[attr] = {str(k): np.asarray(v) for k, v in items}
    return out


def set_state(strategy: FedAvg, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    for attr, arrays in state.items():
        setattr(strategy, attr, [arrays[str(i)] for i in range(len(arrays))] if attr == "momentum_vector" else dict(arrays))


@contextmanager
def _quiet() -> Iterator[None]:
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flower.setLevel(level)


@dataclass(frozen=True)
class Reply:
    """A saved update as Flower's aggregation reads a reply: its content, no error."""

    content: RecordDict

    def has_error(self) -> bool:
        return False


@dataclass(frozen=True)
class Saved:
    """One hospital's saved update: its model, its weight and (SCAFFOLD) its control change."""

    hospital: str
    arrays: dict[str, np.ndarray]
    weight: int
    control: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Replayed:
    new: dict[str, np.ndarray] | None  # the aggregate (None: the rule skipped the round)
    state: dict[str, dict[str, np.ndarray]]  # the server state after the step
    selected: list[str] | None  # the hospitals a selecting rule kept


def replay(cfg: FedmedConfig, server_round: int, sent: dict[str, np.ndarray], updates: list[Saved], state: Mapping[str, Mapping[str, np.ndarray]]) -> Replayed:
    """The round's aggregation as the server ran it: the same strategy class and
    parameters, the server state it had before the round, the updates in hospital order."""
    bare = FLOWER[cfg.federation.strategy](weighted_by_key=wire.WEIGHT, **settings(cfg))
    set_state(bare, state)
    if isinstance(bare, FedAvgM):
        bare.current_arrays = ArrayRecord({k: Array(v) for k, v in sent.items()})
    elif hasattr(bare, "current_arrays"):  # FedOpt's, SCAFFOLD's: the model the round sent
        bare.current_arrays = dict(sent)
    contents = []
    for u in updates:
        records: dict[str, Any] = {wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in u.arrays.items()}), wire.METRICS: MetricRecord({wire.WEIGHT: u.weight})}
        if u.control:
            records[wire.CONTROL] = ArrayRecord({k: Array(v) for k, v in u.control.items()})
        contents.append(RecordDict(records))
    picked = selected(cfg, contents)
    with _quiet():  # Flower logs each aggregation it runs: the audit's replays are not rounds
        arrays, _ = bare.aggregate_train(server_round, [Reply(c) for c in contents])
    new = {k: v.numpy() for k, v in arrays.items()} if arrays is not None else None
    return Replayed(new, get_state(bare), None if picked is None else [updates[i].hospital for i in picked])
