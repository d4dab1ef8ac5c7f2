"""The wire format: every key fedmed's ServerApp and ClientApp exchange through Flower,
in both directions, and the node and run config entries that Flower hands them. The
server's ledger, the audit and the deployment commands read these names from here.

A training or evaluation request (a Message's RecordDict):
    "arrays"  ArrayRecord   the global model
    "config"  ConfigRecord  the run's settings, flat: all that decide results for simulated
                            hospitals (`FedmedConfig.for_hospitals`), only those that change
                            what it computes for a real node (`FedmedConfig.for_nodes`); plus
                            SERVER_ROUND, the round's LR, FedProx's PROXIMAL_MU, the ledger entries
                            LEDGER_RUN, LEDGER_CHECKPOINT (and, simulated, LEDGER_ROOT and
                            LEDGER_KEYS), and
                            for a simulated node the HOSPITAL it plays, for a real node
                            ENROLLED_AS and its BUDGET; a training request
                            may ask for EVALUATE_FIRST
    CONTROL   ArrayRecord   SCAFFOLD: the server's control variate (training requests)
A reply:
    "arrays"  ArrayRecord   the update (training replies that trained)
    CONTROL   ArrayRecord   SCAFFOLD: the change of the hospital's control variate
    "metrics" MetricRecord  aggregate figures, `train-*` / `eval-*` / `dp-*`, and WEIGHT
    SITE      ConfigRecord  {"name": the hospital's name}
    DECLINED  ConfigRecord  {"reason": why, and its `dp-*` figures}: a refusal, no arrays
    LEDGER    ConfigRecord  {"checkpoint": the hospital's signed ledger checkpoint, JSON}
    EVALUATION ConfigRecord the `eval-*` figures and WEIGHT of the model it was sent
                            (a training reply to EVALUATE_FIRST, trained or declined)

A real node's Flower run config (`Context.run_config`) is empty: every node of a run is
sent the same one, and the server's own settings stay on the server.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmed.config import FedmedConfig, from_flat

# ---- records in a Message ----------------------------------------------------------
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
CONTROL = "control"  # SCAFFOLD: the server's control variate (requests), the hospital's change of its own (replies)
SITE = "site"
DECLINED = "declined"
LEDGER = "ledger"
EVALUATION = "evaluation"

# ---- keys in the request's config that are not fedmed settings ----------------------
SERVER_ROUND = "server-round"  # Flower's own
PROXIMAL_MU = "proximal-mu"  # added by Flower's FedProx
LEDGER_ROOT = "ledger-root"  # where simulated hospitals keep their ledgers (the run directory's)
LEDGER_KEYS = "ledger-keys"  # where simulated hospitals keep their keys (the user's key store, outside the run)
LEDGER_RUN = "ledger-run"  # the ledger run id
LEDGER_CHECKPOINT = "ledger-checkpoint"  # the server's signed ledger checkpoint, JSON
HOSPITAL = "hospital-index"  # a simulated node: the hospital it plays for this request (its data)
ENROLLED_AS = "enrolled-as"  # a real node: the name the server enrolled its key under
BUDGET = "privacy-budget"  # a real node: the epsilon the server lets it spend in this run (0: no limit)
LR = "round-lr"  # the learning rate of this round (`train.schedule`), set by the server
# A training request that also asks the hospital to evaluate the model it is sent (the
# previous round's global model) before training: one message per round, not two.
EVALUATE_FIRST = "evaluate-first"

# ---- metric names the server reads ----------------------------------------------------
WEIGHT = "num-examples"  # FedAvg's weight
LABEL_COUNTS = "label-counts"  # a hospital's training labels per class (the heterogeneity report)
EVAL_ACCURACY, EVAL_MACRO_F1, EVAL_CONFUSION = "eval-accuracy", "eval-macro-f1", "eval-confusion"
LAYERS_RESTORED = "local-arrays-restored"  # FedBN, FedPer: the hospital's own layers put back
VAL_ACCURACY, VAL_CONFUSION = "val-accuracy", "val-confusion"  # the global model on the hospital's validation split
# Personalisation: the hospital's own model on its own test split, beside the global model's figures
PERSONAL_ACCURACY, PERSONAL_MACRO_F1 = "personal-accuracy", "personal-macro-f1"

# ---- node config (what a SuperNode tells its ClientApp) -------------------------------
PARTITION_ID = "partition-id"  # a simulated node's partition (the engine's), for a node the server names no hospital
SITE_CONFIG = "site-config"  # a real hospital's site config file, on its own machine
LEDGER_DIR = "ledger-dir"  # a real hospital's ledger folder, on its own machine

# ---- why the server refuses a reply ---------------------------------------------------
NAME_MISMATCH = "name does not match the enrolled key"
OTHER_NAME = "a reply under another hospital's name"  # a simulated node's: it plays the hospital its request names


def config_record(cfg: FedmedConfig, deployed: bool = False) -> ConfigRecord:
    """The run's training settings, flat, so every hospital trains the same way; a real
    node (`deployed`) is sent only those that change what it computes."""
    return ConfigRecord({**(cfg.for_nodes() if deployed else cfg.for_hospitals()), SERVER_ROUND: 0})


def config_from_record(record: ConfigRecord) -> FedmedConfig:
    """fedmed's settings from a request's config; keys with a dash are not settings
    (SERVER_ROUND, PROXIMAL_MU, the ledger entries)."""
    return from_flat({k: v for k, v in record.items() if "-" not in k})


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


def reply(request: Message, site: str, checkpoint: dict[str, Any], **records: Any) -> Message:
    """A hospital's reply: its name, its ledger checkpoint and `records` (METRICS, ARRAYS, DECLINED)."""
    content = RecordDict({SITE: ConfigRecord({"name": site}), LEDGER: ConfigRecord({"checkpoint": json.dumps(checkpoint, sort_keys=True)}), **records})
    return Message(content=content, reply_to=request)


def site_name(content: RecordDict) -> str:
    return str(content[SITE]["name"])


def metrics_of(content: RecordDict) -> dict[str, Any]:
    return dict(next(iter(content.metric_records.values())))


def ledger_checkpoint(content: RecordDict) -> dict[str, Any] | None:
    """The hospital's signed checkpoint from its reply (None, for the audit to report, if
    it sent none or something else)."""
    try:
        checkpoint = json.loads(str(content[LEDGER]["checkpoint"]))
    except (KeyError, ValueError, RecursionError):
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def server_checkpoint(config: ConfigRecord) -> dict[str, Any] | None:
    return json.loads(str(config[LEDGER_CHECKPOINT])) if LEDGER_CHECKPOINT in config else None
