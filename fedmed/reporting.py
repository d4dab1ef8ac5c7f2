"""The shape of what a run reports, shared by federated and baseline runs."""

from __future__ import annotations

import time
from typing import Any

from fedmed import __version__
from fedmed.config import FedmedConfig
from fedmed.data.sites import describe

TEST_KEYS = ("accuracy", "macro_f1", "auroc", "loss", "per_class_recall", "confusion", "examples")


def test_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in TEST_KEYS if k in metrics}


def strip_prefix(metrics: dict[str, Any]) -> dict[str, Any]:
    """`eval-accuracy` -> `accuracy`, `num-examples` -> `examples`: Flower's key style
    to the run directory's, so federated and baseline records use the same keys."""
    out = {}
    for key, value in metrics.items():
        for prefix in ("train-", "eval-", "num-"):
            key = key.removeprefix(prefix)
        out[key.replace("-", "_")] = value
    return out


def round_record(rnd: int, took: float, elapsed: float, test: dict[str, Any], hospitals: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "round": rnd,
        "time_s": round(took, 3),
        "elapsed_s": round(elapsed, 3),
        "finished_at": time.time(),
        "test": test_metrics(test),
        "hospitals": hospitals,
        **extra,
    }


def summary(cfg: FedmedConfig, test: dict[str, Any], per_hospital: dict[str, Any], wall_seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "mode": cfg.federation.mode,
        "rounds": cfg.federation.rounds,
        "num_hospitals": cfg.data.hospitals,
        "classes": list(cfg.data.class_names()),
        "data": describe(cfg),
        "test": test_metrics(test),
        "per_hospital": per_hospital,
        "wall_seconds": round(wall_seconds, 3),
        "seed": cfg.seed,
        "config_sha256": cfg.digest(),
        "fedmed_version": __version__,
        **extra,
    }
