"""TensorBoard event files for a run (`output.tensorboard`), for researchers who track
their runs there: `tensorboard --logdir runs/` shows every run. Written from the round
records, so they hold what `metrics.jsonl` holds: aggregates per hospital pseudonym."""

from __future__ import annotations

from typing import Any

from fedmed.errors import FedmedError
from fedmed.run.directory import RunDirectory

FOLDER = "tensorboard"


class Scalars:
    """One run's scalars, a step per round."""

    def __init__(self, out: RunDirectory) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FedmedError("output.tensorboard needs TensorBoard: pip install 'fedmed[tensorboard]', or set output.tensorboard = false") from None
        self.writer = SummaryWriter(log_dir=str(out / FOLDER))

    def round(self, record: dict[str, Any]) -> None:
        """The round's global test figures, the hospitals' pooled and own evaluations,
        their training loss, the fairness figures and the round's time."""
        step = int(record["round"])
        scalars = {f"test/{k}": v for k, v in record.get("test", {}).items() if k in ("accuracy", "macro_f1", "auroc", "loss", "ece", "brier")}
        scalars.update({f"hospitals/pooled_{k}": v for k, v in (record.get("federated_eval") or {}).items() if k in ("accuracy", "macro_f1")})
        scalars.update({f"fairness/{k}": v for k, v in (record.get("fairness") or {}).items() if k != "worst_hospital"})
        for site, phases in record.get("hospitals", {}).items():
            scalars.update({f"hospital/{site}/{k}": v for k, v in phases.get("eval", {}).items() if k in ("accuracy", "personal_accuracy")})
            if "loss" in phases.get("train", {}):
                scalars[f"hospital/{site}/train_loss"] = phases["train"]["loss"]
        scalars["time/round_s"] = record.get("time_s")
        for tag, value in scalars.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
