"""SHA-256 digests of what a ledger refers to but must not contain: model weights and
the model's architecture; and the commitment (an HMAC) to a hospital's data."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn


def arrays_digest(arrays: ArrayRecord | Mapping[str, Any]) -> str:
    """Over names, dtypes, shapes and bytes, in name order: the same weights give the
    same digest whether they are a state dict, an ArrayRecord or a saved `.npz`."""
    h = hashlib.sha256()
    for name in sorted(arrays.keys()):
        value = arrays[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        elif not isinstance(value, np.ndarray):
            value = value.numpy()  # flwr Array
        value = np.ascontiguousarray(value)
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file's bytes, None if there is no such file."""
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def architecture_digest(model: nn.Module) -> str:
    """The layers as PyTorch prints them, and every tensor's name and shape."""
    shapes = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join([repr(model), *shapes]).encode()).hexdigest()


def data_commitment(secret: bytes, *tensors: torch.Tensor) -> str:
    """HMAC-SHA256 of the data itself (never file names) under the hospital's secret: it
    changes if any image or label does, and without the secret it tells nothing about
    which data it was (an unkeyed digest would confirm a guessed copy)."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for t in tensors:
        array = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def state_digest(state: Mapping[str, Mapping[str, Any]]) -> str:
    """An aggregation's server state (named groups of arrays: moments, momentum, a
    control variate), as one digest; no state at all has one too."""
    return arrays_digest({f"{name}/{key}": value for name, values in state.items() for key, value in values.items()})
