"""Epsilon recomputed independently of Opacus, with Google's dp-accounting."""

from __future__ import annotations

import dp_accounting


def independent_epsilon(kind: str, sigma: float, rate: float, steps: int, delta: float) -> float:
    """RDP against fedmed's `rdp`; PLD (the tight one) against fedmed's `prv`."""
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    accountant = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    return accountant.compose(event).get_epsilon(delta)
