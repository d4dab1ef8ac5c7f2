"""The run directory: every file a run writes, named here and nowhere else, and written
with one atomic write, so a crash never leaves half a file.

Only aggregates go here (metrics, counts, hospital pseudonyms): never file names, paths
from a hospital's data, or pixels.
"""

from __future__ import annotations

import io
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
from fedmed.errors import FedmedError, os_error_line

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
    alone (mode 0600) unless not `private` (then as the umask allows, as `open` would).
    An OSError (a full disk) leaves no temporary file and names `path`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            raise _naming(exc, path) from None  # closing the temporary file failed too: one error
        raise


def append_bytes(path: Path, data: bytes, sync: bool = False) -> None:
    """Append `data` (whole lines) to `path`, created if missing. When it cannot all be
    written (a full disk), the file is cut back to what it held, so no torn line is left,
    and the OSError names `path`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise _naming(exc, path) from None
    finally:
        os.close(fd)


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc`, naming `path` (errors from writing through a handle name no file)."""
    exc.filename = str(path)
    return exc


def write_new(path: Path, data: bytes, mode: int) -> None:
    """A file that did not exist (FileExistsError if it did), created with `mode` and on
    disk before returning: for keys, which are never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:  # a full disk: no half-written key is left to be refused as existing
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


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
    SCORES = "scores.npz"  # the final model's class probabilities on the global test set, with its labels
    CHECKPOINT = "checkpoint.pkl"  # the server's state after its last finished round
    HETEROGENEITY = "heterogeneity.json"
    HEATMAP = "heterogeneity.png"
    LEDGERS = "ledgers"  # ledgers/<run id>/<party>.jsonl, ledgers/keys/<party>.{key,pub}
    UPDATES = "updates"  # updates/round-NNN.npz: each round's model sent and updates received
    AUDIT = "audit.json"  # written by `fedmed audit`, with AUDIT_REPORT
    AUDIT_REPORT = "audit.md"
    STATUS = "status.json"  # {"state": running | finished | interrupted, "after_round", "rounds", "signal"}

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.on_round: Callable[[dict[str, Any]], None] | None = None  # also told each round record (TensorBoard)

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
            raise FedmedError(f"cannot create run directory {out.path}: {os_error_line(exc)}") from None
        return out

    @classmethod
    def reopen(cls, path: Path, after_round: int) -> RunDirectory:
        """A run resumed after `after_round`: later rounds' records (from a round the
        crash cut short) are dropped, so no round appears twice."""
        out = cls(path)
        if not (out / cls.CONFIG).is_file():
            raise FedmedError(f"{path} is not a run directory (no {cls.CONFIG}): nothing to resume")
        kept = [r for r in out.checked_rounds() if int(r["round"]) <= after_round]
        atomic_write(out / cls.METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), private=False)
        return out

    def append_round(self, record: dict[str, Any]) -> None:
        """One line per round, appended: a reader ignores a last line not yet complete, and a
        full disk leaves none."""
        append_bytes(self / self.METRICS, (json.dumps(json_safe(record), sort_keys=True) + "\n").encode("utf-8"))
        if self.on_round is not None:
            self.on_round(json_safe(record))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self / self.SUMMARY, dumps(summary))

    def write_heterogeneity(self, report: dict[str, Any], heatmap_png: bytes | None) -> None:
        """The report, and its heatmap if given (None: the heatmap is drawn later)."""
        atomic_write(self / self.HETEROGENEITY, json.dumps(report, indent=1) + "\n", private=False)
        if heatmap_png is not None:
            atomic_write(self / self.HEATMAP, heatmap_png, private=False)

    def save_scores(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """The final model's scores on the global test set (the server's own data, never a
        hospital's), from which ROC curves and calibration are drawn and checked."""
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, probs=probs.astype(np.float64), labels=labels.astype(np.int64))  # as the figures were computed
        atomic_write(self / self.SCORES, buffer.getvalue(), private=False)

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        import torch  # seconds to import: not for the commands that only read run directories

        buffer = io.BytesIO()  # torch.save into a file turns a full disk's OSError into a RuntimeError
        torch.save(state_dict, buffer)
        atomic_write(self / self.MODEL, buffer.getvalue(), private=False)

    def save_updates(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        """The round's model sent and each hospital's update: as sensitive as the
        hospitals' data without DP, so its owner's alone."""
        import numpy as np

        (self / self.UPDATES).mkdir(exist_ok=True)
        atomic_write(self.updates_of(server_round), lambda handle: np.savez(handle, **arrays))

    def write_status(self, state: str, after_round: int, rounds: int, signal: str | None = None) -> None:
        """Where the run stands: running, finished, or interrupted (by `signal`) after
        `after_round` of its `rounds` rounds."""
        atomic_write(self / self.STATUS, dumps({"state": state, "after_round": after_round, "rounds": rounds, "signal": signal}), private=False)

    def write_audit(self, report_json: str, report_md: str) -> None:
        """Both reports, or (a full disk) neither: never one that disagrees with the other."""
        atomic_write(self / self.AUDIT, report_json)
        try:
            atomic_write(self / self.AUDIT_REPORT, report_md)
        except OSError:
            (self / self.AUDIT).unlink(missing_ok=True)
            (self / self.AUDIT_REPORT).unlink(missing_ok=True)  # an earlier audit's
            raise

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

    def checked_rounds(self) -> list[dict[str, Any]]:
        """rounds(), each a JSON object with a round number, or one line (FedmedError)
        saying the file was edited: what a resumed run continues."""
        try:
            records = self.rounds()
            if all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in records):
                return records
        except ValueError:
            pass
        raise FedmedError(f"{self / self.METRICS} is not one JSON round record per line (it was edited): restore it to resume")

    def status(self) -> dict[str, Any] | None:
        """status.json, None if the run wrote none (or it is not a JSON object)."""
        try:
            status = json.loads((self / self.STATUS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def summary(self) -> dict[str, Any]:
        return json.loads((self / self.SUMMARY).read_text(encoding="utf-8"))

    def heterogeneity(self) -> dict[str, Any] | None:
        path = self / self.HETEROGENEITY
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def ledger_runs(self) -> list[Path]:
        """The folders of ledgers under ledgers/, one per ledger run id."""
        folder = self / self.LEDGERS
        return sorted(p for p in folder.glob("*") if p.is_dir() and p.name != "keys") if folder.is_dir() else []
