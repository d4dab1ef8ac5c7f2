"""The run directory: config, per-round metrics, summary and final model.

Only aggregates go here (metrics, counts, hospital pseudonyms): never file names,
paths from a hospital's data, or pixels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from fedmed.config import FedmedConfig, unflatten
from fedmed.errors import FedmedError

if TYPE_CHECKING:
    import torch


def json_safe(value: Any) -> Any:
    """NaN and infinities (JSON has neither) become null; keys strings, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_new(path: Path, data: bytes, mode: int) -> None:
    """A file that did not exist (FileExistsError if it did), created with `mode` and on
    disk before returning: for keys, which are never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def run_path(cfg: FedmedConfig) -> Path:
    return Path(cfg.output.dir).expanduser() / cfg.output.name


def resolve_run_name(cfg: FedmedConfig) -> FedmedConfig:
    """Give the run a fresh timestamped directory name unless the config names one;
    a named directory that already holds a run is refused, never overwritten."""
    if cfg.output.name:
        if (run_path(cfg) / "config.toml").exists():
            raise FedmedError(
                f"run directory {run_path(cfg)} already holds a run: choose another "
                "output.name or leave it empty for a timestamped one"
            )
        return cfg
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.federation.mode}"
    name, n = stem, 1
    while (Path(cfg.output.dir).expanduser() / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"name": name})})


class RunDirectory:
    """Writes one run's outputs; refuses to reuse a directory that already has a run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, cfg: FedmedConfig) -> RunDirectory:
        cfg = resolve_run_name(cfg)
        path = run_path(cfg)
        try:
            path.mkdir(parents=True, exist_ok=True)
            atomic_write(path / "config.toml", tomli_w.dumps(unflatten(cfg.shareable())))
            (path / "metrics.jsonl").touch()
        except OSError as exc:
            raise FedmedError(f"cannot create run directory {path}: {exc.strerror}") from None
        return cls(path)

    @classmethod
    def reopen(cls, path: Path, after_round: int) -> RunDirectory:
        """A run resumed after `after_round`: later rounds' records (from a round the
        crash cut short) are dropped, so no round appears twice."""
        if not (path / "config.toml").is_file():
            raise FedmedError(f"{path} is not a run directory (no config.toml): nothing to resume")
        kept = [r for r in read_metrics(path) if int(r.get("round", 0)) <= after_round]
        atomic_write(path / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return cls(path)

    def append_round(self, record: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
            handle.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / "summary.json", json.dumps(json_safe(summary), indent=2, sort_keys=True) + "\n")

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        import torch  # seconds to import: not for the commands that only read run directories

        tmp = self.path / ".model.pt.tmp"
        torch.save(state_dict, tmp)
        os.replace(tmp, self.path / "model.pt")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# Fields that measure time, and so differ between otherwise identical runs.
TIMING_FIELDS = ("time_s", "elapsed_s", "finished_at")
