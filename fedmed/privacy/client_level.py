"""Client-level DP (DP-FedAvg, McMahan et al. 2018) at the server: each hospital's
update is clipped to `max_grad_norm`, the clipped updates are averaged unweighted
(weighting by sample counts would break the sensitivity bound) over the m hospitals
asked each round, and Gaussian noise of standard deviation sigma * clip / m is added.
One release per round. The noise comes from the system's entropy unless
`privacy.reproducible` (a simulation).

Flower's DifferentialPrivacyServerSideFixedClipping does the same arithmetic but needs
equal weights in every reply and cannot leave out the layers FedBN keeps at the hospitals; hence this module.

Hospitals are sampled as a fixed-size set each round, not Poisson: no amplification by
sampling is claimed (sample rate 1 in the ledger), which only overstates epsilon.
"""

from __future__ import annotations

import numpy as np

from fedmed.config import FedmedConfig
from fedmed.privacy.accounting import StepHistory, calibrate, check_delta


class ClientLevelDP:
    def __init__(self, cfg: FedmedConfig) -> None:
        p = cfg.privacy
        hospitals = cfg.data.hospitals
        self.delta = check_delta(p.delta, hospitals, "hospitals")
        self.clip = p.max_grad_norm
        self.sigma = p.noise_multiplier or calibrate(p.accountant, p.epsilon, self.delta, 1.0, cfg.federation.rounds)
        self.history = StepHistory(p.accountant)
        # The divisor is fixed (hospitals asked per round), not the replies that arrived:
        # who replied must not change the noise.
        self.per_round = max(1, round(cfg.federation.fraction_train * hospitals))
        self.reproducible = p.reproducible
        self.rng = np.random.default_rng([cfg.seed, 53]) if p.reproducible else np.random.default_rng()

    def aggregate(self, start: dict[str, np.ndarray], updated: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The noisy mean of the clipped updates, applied to `start`, over the keys the
        hospitals sent (others, e.g. the layers FedBN keeps at the hospitals, stay as in `start`)."""
        keys = [k for k in updated[0] if np.issubdtype(start[k].dtype, np.floating)]
        deltas = []
        for arrays in updated:
            delta = {k: arrays[k].astype(np.float64) - start[k] for k in keys}
            norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            deltas.append({k: d * scale for k, d in delta.items()})
        m = self.per_round
        std = self.sigma * self.clip / m
        out = dict(start)
        for k in keys:
            mean = sum(d[k] for d in deltas) / m
            out[k] = (start[k] + mean + self.rng.normal(0.0, std, size=mean.shape)).astype(start[k].dtype)
        self.history.add(self.sigma, 1.0, 1)
        return out

    def metrics(self) -> dict[str, float | int]:
        return {
            "epsilon": self.history.epsilon(self.delta),
            "delta": self.delta,
            "sigma": self.sigma,
            "sample_rate": 1.0,
            "steps": self.history.steps,
            "max_grad_norm": self.clip,
        }

    def state(self) -> dict:
        """What a server checkpoint keeps: the privacy spent and, only for reproducible
        noise (seeded anyway), the generator's position. Secret noise's generator is never
        written down (its state would let anyone replay every draw) and a resumed run
        draws afresh, so a round re-run after a crash never repeats released noise."""
        return {"history": self.history.to_record(), "rng": self.rng.bit_generator.state if self.reproducible else None}

    def restore(self, state: dict) -> None:
        self.history = StepHistory.from_record(self.history.kind, state["history"])
        if state.get("rng") is not None:
            self.rng.bit_generator.state = state["rng"]
