"""SCAFFOLD at a hospital (Karimireddy et al. 2020, Algorithm 1, option II): every SGD
step is corrected by c - c_i (the server's control variate minus the hospital's own);
after K steps of learning rate lr from the global model x to y, the hospital's variate
becomes c_i+ = c_i - c + (x - y) / (K lr), and it sends the change c_i+ - c_i.
Variates are keyed by parameter name; a missing one is zero (round 1, a new hospital)."""

from __future__ import annotations

import torch
from torch import nn

Variate = dict[str, torch.Tensor]


def correction(model: nn.Module, server: Variate, own: Variate) -> Variate:
    """c - c_i for each of the model's parameters."""
    return {name: _get(server, name, p) - _get(own, name, p) for name, p in model.named_parameters()}


def step(model: nn.Module, start: dict[str, torch.Tensor], server: Variate, own: Variate, steps: int, lr: float) -> tuple[Variate, Variate]:
    """(c_i+, c_i+ - c_i) once the model has taken `steps` SGD steps of `lr` from `start`;
    with no step taken, the variate stays."""
    new, change = {}, {}
    for name, p in model.named_parameters():
        c_i = _get(own, name, p)
        if steps:
            new[name] = c_i - _get(server, name, p) + (start[name].to(p.device) - p.detach()) / (steps * lr)
        else:
            new[name] = c_i.clone()
        change[name] = new[name] - c_i
    return {k: v.cpu() for k, v in new.items()}, {k: v.cpu() for k, v in change.items()}


def _get(variate: Variate, name: str, like: torch.Tensor) -> torch.Tensor:
    value = variate.get(name)
    return torch.zeros_like(like.detach()) if value is None else value.to(like.device, like.dtype)
