"""The learning rate of each round: the server computes it and sends it in the round's
request (`wire.LR`), so every hospital trains a round at the same rate and a resumed run
continues the schedule where it stopped."""

from __future__ import annotations

import math

from fedmed.config import TrainConfig


def lr_at(train: TrainConfig, server_round: int, rounds: int) -> float:
    """`train.lr` decayed to round `server_round` (1-based) of `rounds`: constant; cosine
    from `lr` (round 1) to `lr_min` (the last round); step, times `step_gamma` after every
    `step_rounds` rounds."""
    if train.schedule == "cosine":
        progress = (server_round - 1) / max(rounds - 1, 1)
        return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1 + math.cos(math.pi * progress))
    if train.schedule == "step":
        return train.lr * train.step_gamma ** ((server_round - 1) // train.step_rounds)
    return train.lr
