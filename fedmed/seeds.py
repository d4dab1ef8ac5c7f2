"""Seeds derived from the run seed, so every random choice is reproducible."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """An independent 31-bit seed for each (run seed, round, hospital, ...) tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)
