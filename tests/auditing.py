"""What the audit tests share: a run's config, the audit run quietly, its report."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from fedmed import config as config_mod
from fedmed.audit.report import audit
from fedmed.run.directory import RunDirectory

from .conftest import TINY

# Canaries at hospital-01, trained hard enough that a run without noise shows it.
CANARY_RUN = ("data.hospitals=2", "data.train_per_hospital=64", "privacy.epsilon=1", "privacy.reproducible=true", "privacy.canaries=128",
              "federation.rounds=2", "train.local_epochs=10", "train.batch_size=16", "train.optimizer=sgd", "train.lr=0.5")


def dp_config(cache_dir: str, out: Path, *extra: str) -> config_mod.FedmedConfig:
    """A tiny run with sample-level DP."""
    return config_mod.load(None, [*TINY, "privacy.mode=sample", *extra], {"data.cache_dir": cache_dir, "output.dir": str(out)})


def audit_of(path: Path | list[Path], **kwargs) -> tuple[int, dict]:
    """`fedmed audit`'s exit code and its audit.json."""
    paths = path if isinstance(path, list) else [path]
    code = audit(paths, console=Console(quiet=True), **kwargs)
    target = kwargs.get("out_dir") or paths[0]
    return code, json.loads((target / RunDirectory.AUDIT).read_text())
