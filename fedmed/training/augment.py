"""Data augmentation at a hospital (`train.augment`), applied to each batch as tensors.

`flip` mirrors a random half of the batch left-right (the brain is near-symmetric), from
the training stream, as fedmed always has. The others are MONAI's random transforms,
chosen over torchvision's transforms v2 because MONAI has the MRI-specific ones (a
smooth multiplicative bias field, Rician noise: what MR magnitude images carry) and
gives every transform its own random state, so each image's parameters are drawn from
a seed of its own, (run seed, round, hospital) x (epoch, image): the same image is
augmented the same way whatever batch it lands in (torchvision v2 draws one set of
parameters per call, shared by the whole batch). MONAI is imported only when one of
them is asked for (it takes seconds).

    rotate      up to 15 degrees either way            (RandAffine)
    zoom        0.9-1.1                                (RandAffine)
    intensity   intensity x 0.9-1.1, gamma 0.8-1.25    (RandScaleIntensity, RandAdjustContrast)
    bias_field  a smooth field, coefficients up to 0.2 (RandBiasField)
    noise       Rician noise, std up to 0.03           (RandRicianNoise)
Each transform but flip applies to an image with probability 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedmed.seeds import derive_seed

PER_IMAGE = ("rotate", "zoom", "intensity", "bias_field", "noise")


def flip_half(x: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the batch left-right (the training stream's draw)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class PerImage:
    """The MONAI transforms `names` asks for, each image's drawn from its own seed."""

    def __init__(self, names: Sequence[str], seed: int) -> None:
        from monai.data import set_track_meta
        from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, RandRicianNoise, RandScaleIntensity

        set_track_meta(False)  # plain tensors out, as the model and Opacus expect (no MetaTensor)
        self.seed = seed
        self.transforms: list[Any] = []
        if "rotate" in names or "zoom" in names:
            self.transforms.append(RandAffine(
                prob=0.5, rotate_range=(math.radians(15),) if "rotate" in names else None,
                scale_range=(0.1, 0.1) if "zoom" in names else None, padding_mode="zeros",
            ))  # fmt: skip
        if "intensity" in names:
            self.transforms += [RandScaleIntensity(factors=0.1, prob=0.5), RandAdjustContrast(gamma=(0.8, 1.25), prob=0.5)]
        if "bias_field" in names:
            self.transforms.append(RandBiasField(coeff_range=(0.0, 0.2), prob=0.5))
        if "noise" in names:
            self.transforms.append(RandRicianNoise(prob=0.5, std=0.03, sample_std=True))

    def __call__(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Images (N, 1, H, W) in [0, 1], each augmented from (seed, epoch, its index), clipped to [0, 1]."""
        if len(x) == 0:  # Poisson sampling (DP-SGD) can draw an empty batch
            return x
        out = []
        for image, i in zip(x.cpu(), index.tolist(), strict=True):
            for k, transform in enumerate(self.transforms):
                transform.set_random_state(seed=derive_seed(self.seed, epoch, i, k))
                image = torch.as_tensor(transform(image), dtype=torch.float32)
            out.append(image)
        return torch.stack(out).clamp_(0.0, 1.0).to(x.device)


def per_image(names: Sequence[str], seed: int) -> PerImage | None:
    """The per-image transforms `names` asks for, or None (flip alone, or nothing)."""
    return PerImage(names, seed) if any(name in PER_IMAGE for name in names) else None
