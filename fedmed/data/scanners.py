"""Scanner profiles: how one hospital's MRI differs from another's.

Real sites differ in field strength (noise), coil inhomogeneity (bias field),
sequence contrast and reconstructed resolution. Each simulated hospital draws one
profile; each image jitters around it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ScannerProfile:
    field_strength: str  # "1.5T" or "3T": lower field, more noise
    noise: float  # Rician noise sigma, fraction of white-matter intensity
    bias: float  # amplitude of the smooth multiplicative bias field (log scale)
    gamma: float  # contrast curve applied to the normalised image
    blur: float  # Gaussian blur sigma in output pixels (coarser acquisition)
    gain: float  # overall brightness of the reconstructed image

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def hospital_profiles(num_hospitals: int, seed: int) -> list[ScannerProfile]:
    """One profile per hospital, deterministic in `seed`."""
    rng = np.random.default_rng([seed, 7919])
    profiles = []
    for _ in range(num_hospitals):
        high_field = bool(rng.random() < 0.5)
        profiles.append(
            ScannerProfile(
                field_strength="3T" if high_field else "1.5T",
                noise=float(rng.uniform(0.02, 0.04) if high_field else rng.uniform(0.04, 0.07)),
                bias=float(rng.uniform(0.05, 0.35)),
                gamma=float(rng.uniform(0.8, 1.25)),
                blur=float(rng.uniform(0.0, 0.9)),
                gain=float(rng.uniform(0.8, 1.0)),
            )
        )
    return profiles
