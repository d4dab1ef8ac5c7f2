"""Hospitals that misbehave, in simulation (`[attack]`): which hospitals, and what each
sends instead of an honest update. The attackers are named in the run's summary and in
their own ledgers; a real node never attacks (the section is never sent to one).

With w_g the model a hospital received and w the model it trained, it sends:
    label_flip   w, trained on labels reversed (class c as C-1-c)
    sign_flip    w_g - (w - w_g)
    scale        w_g + factor (w - w_g)
    gaussian     w_g + N(0, std^2), on every weight
    free_rider   w_g
Only floating-point arrays change (a BatchNorm's step counter stays as trained).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmed.config import AttackConfig, FedmedConfig
from fedmed.data.demo import hospital_name
from fedmed.errors import FedmedError
from fedmed.seeds import derive_seed

ATTACK_STREAM = 7  # the seed stream that draws the attackers and their noise


def attackers(cfg: FedmedConfig, names: list[str] | None = None) -> list[str]:
    """The attacking hospitals, sorted: `attack.hospitals` drawn from the seed (a count)
    or as named, among `names` (default: the simulation's hospitals)."""
    a = cfg.attack
    if not a.active:
        return []
    pool = names if names is not None else [hospital_name(i) for i in range(cfg.data.hospitals)]
    if isinstance(a.hospitals, int):
        picked = np.random.default_rng([cfg.seed, ATTACK_STREAM]).choice(len(pool), size=a.hospitals, replace=False)
        return sorted(pool[i] for i in picked)
    unknown = sorted(set(a.hospitals) - set(pool))
    if unknown:
        raise FedmedError(f"attack.hospitals names {', '.join(unknown)}, not a hospital of this run ({pool[0]} ... {pool[-1]})")
    return sorted(a.hospitals)


def parameters(a: AttackConfig) -> dict[str, Any]:
    """The attack's own setting, for the summary."""
    return {"factor": a.factor} if a.kind == "scale" else {"std": a.std} if a.kind == "gaussian" else {}


def describe(a: AttackConfig) -> str:
    return {
        "label_flip": "train on reversed labels",
        "sign_flip": "send their updates negated",
        "scale": f"send their updates times {a.factor:g}",
        "gaussian": f"send the global model plus Gaussian noise (std {a.std:g})",
        "free_rider": "send back the model they received",
    }[a.kind]


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class c as C-1-c; an unknown label (-1) stays unknown."""
    return torch.where(y >= 0, num_classes - 1 - y, y)


def tamper(a: AttackConfig, received: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """What an attacker sends in place of `trained`, having received `received`."""
    if a.kind == "label_flip":
        return trained
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in trained.items():
        w_g = received[key]
        if not w.is_floating_point():
            out[key] = w
        elif a.kind == "sign_flip":
            out[key] = w_g - (w - w_g)
        elif a.kind == "scale":
            out[key] = w_g + a.factor * (w - w_g)
        elif a.kind == "gaussian":
            out[key] = w_g + a.std * torch.randn(w.shape, generator=generator, dtype=w.dtype)
        else:  # free_rider
            out[key] = w_g.clone()
    return out


def noise_seed(cfg: FedmedConfig, server_round: int, index: int) -> int:
    return derive_seed(cfg.seed, server_round, index, ATTACK_STREAM)
