"""The run directory: every file a run writes, named here and nowhere else, and written
with one atomic write, so a crash never leaves half a file.

Only aggregates go here (metrics, counts, hospital pseudonyms): never file names, paths
from a hospital's data, or pixels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import tomli_w

from fedmed.config import FedmedConfig, unflatten
from fedmed.errors import FedmedError

if TYPE_CHECKING:
    import numpy as np
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


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes | str | Callable[[IO[bytes]], None], private: bool = True) -> None:
    """Write `data` (bytes, text, or a function that writes to a binary handle) to a
    temporary file beside `path`, put it on disk, then rename it over `path`: a reader or
    a crash sees the old file or the new one, never half of one. The file is its owner's
    alone (mode 0600) unless not `private` (then as the umask allows, as `open` would)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_new(path: Path, data: bytes, mode: int) -> None:
    """A file that did not exist (FileExistsError if it did), created with `mode` and on
    disk before returning: for keys, which are never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def dumps(value: Any) -> str:
    """A JSON document as the run directory writes it."""
    return json.dumps(json_safe(value), indent=2, sort_keys=True) + "\n"


def run_path(cfg: FedmedConfig) -> Path:
    return Path(cfg.output.dir).expanduser() / cfg.output.name


def resolve_run_name(cfg: FedmedConfig) -> FedmedConfig:
    """Give the run a fresh timestamped directory name unless the config names one;
    a named directory that already holds a run is refused, never overwritten."""
    if cfg.output.name:
        if (run_path(cfg) / RunDirectory.CONFIG).exists():
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
    """One run's folder. Writers create or reopen it; readers (the audit, the sweep, the
    server's watcher) open it; both go through the names below."""

    CONFIG = "config.toml"  # the resolved config, paths on this machine redacted
    METRICS = "metrics.jsonl"  # one record per round
    SUMMARY = "summary.json"
    MODEL = "model.pt"  # the final global model's state dict
    CHECKPOINT = "checkpoint.pkl"  # the server's state after its last finished round
    HETEROGENEITY = "heterogeneity.json"
    HEATMAP = "heterogeneity.png"
    LEDGERS = "ledgers"  # ledgers/<run id>/<party>.jsonl, ledgers/keys/<party>.{key,pub}
    UPDATES = "updates"  # updates/round-NNN.npz: each round's model sent and updates received
    AUDIT = "audit.json"  # written by `fedmed audit`, with AUDIT_REPORT
    AUDIT_REPORT = "audit.md"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- writing -----------------------------------------------------------------

    @classmethod
    def create(cls, cfg: FedmedConfig) -> RunDirectory:
        cfg = resolve_run_name(cfg)
        out = cls(run_path(cfg))
        try:
            out.path.mkdir(parents=True, exist_ok=True)
            atomic_write(out / cls.CONFIG, tomli_w.dumps(unflatten(cfg.shareable())))
            (out / cls.METRICS).touch()
        except OSError as exc:
            raise FedmedError(f"cannot create run directory {out.path}: {exc.strerror}") from None
        return out

    @classmethod
    def reopen(cls, path: Path, after_round: int) -> RunDirectory:
        """A run resumed after `after_round`: later rounds' records (from a round the
        crash cut short) are dropped, so no round appears twice."""
        out = cls(path)
        if not (out / cls.CONFIG).is_file():
            raise FedmedError(f"{path} is not a run directory (no {cls.CONFIG}): nothing to resume")
        kept = [r for r in out.rounds() if int(r.get("round", 0)) <= after_round]
        atomic_write(out / cls.METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), private=False)
        return out

    def append_round(self, record: dict[str, Any]) -> None:
        """One line per round, appended: a reader ignores a last line not yet complete."""
        with (self / self.METRICS).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
            handle.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self / self.SUMMARY, dumps(summary))

    def write_heterogeneity(self, report: dict[str, Any], heatmap_png: bytes) -> None:
        atomic_write(self / self.HETEROGENEITY, json.dumps(report, indent=1) + "\n", private=False)
        atomic_write(self / self.HEATMAP, heatmap_png, private=False)

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        import torch  # seconds to import: not for the commands that only read run directories

        atomic_write(self / self.MODEL, lambda handle: torch.save(state_dict, handle), private=False)

    def save_updates(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        """The round's model sent and each hospital's update: as sensitive as the
        hospitals' data without DP, so its owner's alone."""
        import numpy as np

        (self / self.UPDATES).mkdir(exist_ok=True)
        atomic_write(self.updates_of(server_round), lambda handle: np.savez(handle, **arrays))

    def write_audit(self, report_json: str, report_md: str) -> None:
        atomic_write(self / self.AUDIT, report_json)
        atomic_write(self / self.AUDIT_REPORT, report_md)

    # ---- reading -----------------------------------------------------------------

    def updates_of(self, server_round: int) -> Path:
        return self / self.UPDATES / f"round-{server_round:03d}.npz"

    def rounds(self) -> list[dict[str, Any]]:
        """The round records written so far; a line still being written is left out."""
        try:
            text = (self / self.METRICS).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def summary(self) -> dict[str, Any]:
        return json.loads((self / self.SUMMARY).read_text(encoding="utf-8"))

    def heterogeneity(self) -> dict[str, Any] | None:
        path = self / self.HETEROGENEITY
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def ledger_runs(self) -> list[Path]:
        """The folders of ledgers under ledgers/, one per ledger run id."""
        folder = self / self.LEDGERS
        return sorted(p for p in folder.glob("*") if p.is_dir() and p.name != "keys") if folder.is_dir() else []
