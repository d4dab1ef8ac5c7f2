"""Epsilon recomputed independently of Opacus, with Google's dp-accounting (the audit's own check)."""

from __future__ import annotations

from fedmed.audit.claims import independent_epsilon as composed


def independent_epsilon(kind: str, sigma: float, rate: float, steps: int, delta: float) -> float:
    """RDP against fedmed's `rdp`; PLD (the tight one) against fedmed's `prv`."""
    return composed(kind, ((sigma, rate, steps),), delta)
