"""Training on partially labelled data: which labels a round trains on, and how a
hospital reports what it had (every reply carries the same keys)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmed.config import FedmedConfig
from fedmed.data.sites import Split
from fedmed.training.loop import pseudo_label


def known_labels(cfg: FedmedConfig, model: nn.Module, split: Split) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """The possible and annotated class sets to train on this round (None: all labels
    known), after pseudo-labelling with `model` (the global model received) when
    configured; and how many images were pseudo-labelled."""
    if split.possible is None or cfg.labels.unlabelled == "ignore":
        return split.possible, split.annotated, 0
    annotated = split.annotated if split.annotated is not None else torch.ones_like(split.possible)
    return pseudo_label(model, split.x, split.possible, annotated, cfg.labels.threshold, cfg.train.device)


def label_metrics(cfg: FedmedConfig, split: Split, pseudo: int) -> dict[str, object]:
    exact = split.y >= 0
    return {
        "label-counts": np.bincount(split.y[exact].numpy(), minlength=cfg.data.num_classes).tolist(),
        "labelled-examples": int(exact.sum()),
        "unlabelled-examples": int((~exact).sum()),
        "pseudo-labelled": pseudo,
    }


def informative_examples(n: int, possible: torch.Tensor | None, annotated: torch.Tensor | None) -> int:
    """Of `n` examples, those whose label (full, coarse or pseudo) carries information this round."""
    if possible is None:
        return n
    annotated = annotated if annotated is not None else torch.ones_like(possible)
    return int((possible.sum(1) < annotated.sum(1)).sum())
