"""Partial labels: what each hospital knows about its training images.

A hospital's knowledge of an image is a set of possible classes (one class: a full
label; several: a coarse or unknown label) within the classes it annotates at all.
Training maximises the probability of the possible set under a softmax over the
annotated classes only (`training.loop.set_loss`), so an unknown image pushes no
class down, and classes a hospital never annotates get no gradient from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmed.config import TUMOUR_FREE, FedmedConfig


@dataclass(frozen=True)
class Knowledge:
    y: torch.Tensor  # (N,) int64: the class where it is known exactly, else -1
    possible: torch.Tensor  # (N, C) bool: classes the image may be
    annotated: torch.Tensor  # (N, C) bool: classes this hospital annotates at all


def affected_hospitals(cfg: FedmedConfig) -> set[int]:
    labels = cfg.labels
    if labels.scenario == "full":
        return set()
    n = max(1, round(labels.hospitals * cfg.data.hospitals))
    return set(np.random.default_rng([cfg.seed, 31]).permutation(cfg.data.hospitals)[:n].tolist())


def knowledge(cfg: FedmedConfig, index: int, y: torch.Tensor) -> Knowledge | None:
    """What hospital `index` knows of its training labels `y`; None: everything. (The
    config checked the classes it names: `FedmedConfig._labels_fit_the_classes`.)"""
    if index not in affected_hospitals(cfg):
        return None
    classes = cfg.data.num_classes
    n = len(y)
    annotated = torch.ones(n, classes, dtype=torch.bool)
    possible = torch.nn.functional.one_hot(y, classes).bool()
    scenario = cfg.labels.scenario
    if scenario == "unlabelled":
        possible[:] = True
    elif scenario == "fraction":
        rng = np.random.default_rng([cfg.seed, 37, index])
        hidden = torch.from_numpy(rng.permutation(n) >= round(cfg.labels.fraction * n))
        possible[hidden] = True
    elif scenario == "subset":
        keep = torch.zeros(classes, dtype=torch.bool)
        keep[[cfg.data.classes.index(c) for c in cfg.labels.annotated]] = True
        annotated[:] = keep
        unknown = ~keep[y]
        possible[unknown] = keep  # not an annotated class, or just not annotated: either way, no information
    else:  # coarse: tumour vs no tumour
        tumour = torch.ones(classes, dtype=torch.bool)
        tumour[cfg.data.classes.index(TUMOUR_FREE)] = False
        possible[tumour[y]] = tumour
    exact = (possible.sum(1) == 1) & (possible.sum(1) < annotated.sum(1))
    return Knowledge(y=torch.where(exact, y, torch.full_like(y, -1)), possible=possible, annotated=annotated)
