"""What `fedmed server start` hands the ServerApp beside Flower, in a file on the server.
Flower gives its run config to every node, so the server's own settings (paths, its test
set, the hospitals' names) never go there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.run.directory import atomic_write

RUN_FILE = "FEDMED_SERVER_RUN"  # environment: a deployed run's settings, on the server (set by `fedmed server start`)


@dataclass(frozen=True)
class DeployedRun:
    """A deployed run's settings for the ServerApp (in `RUN_FILE`, on the server)."""

    config: dict[str, Any]  # the whole config, flat
    resume_from: str  # the run directory to resume; "" for a new run
    nodes: dict[int, str]  # the enrolled hospitals' names by node id
    key_store: str  # the server's signing key's folder, in its state folder (never a run directory)

    def save(self, path: Path) -> None:
        nodes = {str(node): name for node, name in self.nodes.items()}
        saved = {"config": self.config, "resume_from": self.resume_from, "nodes": nodes, "key_store": self.key_store}
        atomic_write(path, json.dumps(saved, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> DeployedRun:
        saved = json.loads(path.read_text(encoding="utf-8"))
        nodes = {int(node): name for node, name in saved["nodes"].items()}
        return cls(saved["config"], saved["resume_from"], nodes, saved.get("key_store") or str(path.parent / "keys"))
