"""Personal models at a hospital, beside the global one: local fine-tuning after the last
round, and Ditto's personal model (Li, Hu, Beirami, Smith, ICML 2021), trained each
round on the hospital's data with lambda/2 ||v - w||^2 pulling it towards the global
model w it received. (FedPer keeps the head at the hospital: `federation` handles it
like FedBN's layers.)"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmed.config import TrainConfig
from fedmed.training.loop import TrainStats, train


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epochs: int, seed: int) -> nn.Module:
    """A copy of `model` trained `epochs` more on the hospital's own data."""
    personal = copy.deepcopy(model)
    train(personal, x, y, cfg, seed=seed, epochs=epochs)
    return personal


def ditto(personal: nn.Module, global_state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epochs: int, lam: float, seed: int) -> TrainStats:
    """Ditto's personal step: `epochs` on the hospital's data minimising its loss plus
    lambda/2 ||v - w_global||^2 (in place on `personal`)."""
    return train(personal, x, y, cfg, seed=seed, epochs=epochs, proximal_mu=lam, anchor=global_state)
