"""ResNet-18 for one-channel images, as Opacus can train it."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class _Block(BasicBlock):
    """torchvision's basic block, adding the shortcut out of place (Opacus's hooks
    forbid modifying a layer's output in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 (same layers and state-dict keys), random init (no
    download), GroupNorm, one input channel."""
    model = ResNet(_Block, [2, 2, 2, 2], num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # Opacus's hooks forbid modifying their outputs in place
    return model
