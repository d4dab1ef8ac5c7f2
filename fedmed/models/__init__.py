"""Networks. GroupNorm by default, so Opacus (DP-SGD) accepts them; BatchNorm only on
request (`model.norm = batch`), and never with DP-SGD."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from fedmed.config import FedmedConfig, ModelConfig
from fedmed.run.directory import atomic_write


class SmallCNN(nn.Module):
    """Four conv-GroupNorm-ReLU-pool blocks and a max-pooled linear head: fast on a CPU."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 1, norm: str = "group") -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        previous = in_channels
        for c in channels:
            layers += [
                nn.Conv2d(previous, c, kernel_size=3, padding=1, bias=False),
                # one group per channel: trains far better here than 8 groups
                nn.GroupNorm(c, c) if norm == "group" else nn.BatchNorm2d(c),
                nn.ReLU(),  # not in place: Opacus's hooks forbid modifying their outputs
                nn.MaxPool2d(2),
            ]
            previous = c
        self.features = nn.Sequential(*layers)
        # Global max pooling: "is there a lesion anywhere" learns far faster than averaging.
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: ModelConfig, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights everywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name == "resnet18":
            from fedmed.models.resnet import resnet18  # torchvision takes seconds to import: only when used

            return resnet18(num_classes)
        return SmallCNN(num_classes, width=cfg.width, norm=cfg.norm)


NORM_LAYERS = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, nn.InstanceNorm2d)


def save_layers(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Some of a model's arrays (FedBN: a hospital's own normalisation layers), written
    whole or not at all, readable by the hospital only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_layers(path: Path) -> dict[str, torch.Tensor] | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the normalisation layers (what FedBN keeps at each hospital)."""
    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if isinstance(module, NORM_LAYERS)
        for key in module.state_dict()
    }


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier, the model's last linear layer (what FedPer keeps
    at each hospital): `head.2` of the CNN, `fc` of ResNet-18."""
    name = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    return {f"{name}.{key}" for key in model.get_submodule(name).state_dict()}


def kept_at_hospitals(cfg: FedmedConfig, model: nn.Module) -> set[str]:
    """The arrays each hospital keeps and the server never averages: FedBN's
    normalisation layers, FedPer's head; none otherwise."""
    if cfg.federation.strategy == "fedbn":
        return norm_keys(model)
    return head_keys(model) if cfg.personal.method == "fedper" else set()
