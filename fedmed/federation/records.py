"""Moving configs, metrics and seeds through Flower's records."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedmed.config import FedmedConfig, from_flat

SITE_KEY = "site"  # ConfigRecord in every reply: {"name": hospital pseudonym}
WEIGHT_KEY = "num-examples"
DECLINED_KEY = "declined"  # ConfigRecord in a reply that trains nothing: {"reason": why}
# Run config entries a deployment adds (not fedmed settings): the run directory to
# resume, and the enrolled hospitals' names by node id (JSON), to name those that drop out.
RESUME_KEY, NODES_KEY = "resume-from", "hospital-nodes"


def config_record(cfg: FedmedConfig, server_round: int = 0) -> ConfigRecord:
    """The run's training settings, flat, so every hospital trains the same way."""
    return ConfigRecord({**cfg.for_hospitals(), "server-round": server_round})


def config_from_record(record: ConfigRecord) -> FedmedConfig:
    """fedmed's settings from a round's config; keys with a dash are Flower's own
    (`server-round`, and `proximal-mu` that FedProx adds)."""
    flat = {k: v for k, v in record.items() if "-" not in k}
    return from_flat(flat)


def metric_record(values: dict[str, Any]) -> MetricRecord:
    """Scalars and lists of numbers only (what MetricRecord carries); None is dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (bool, str)) or value is None:
            continue
        if isinstance(value, list):
            flat = np.asarray(value).ravel()
            out[key] = [int(v) for v in flat] if flat.dtype.kind in "iu" else [float(v) for v in flat]
        else:
            out[key] = value
    return MetricRecord(out)


def site_name(content: RecordDict) -> str:
    return str(content[SITE_KEY]["name"])
