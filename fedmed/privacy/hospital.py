"""A hospital's side of sample-level DP: its plan, the privacy it has spent (read back
from its own signed ledgers, so it survives restarts of the node and of the server), and
its budgets, which it enforces itself before training: the run's, set by the server, and
a real hospital's lifetime cap on its data over all runs (`site.max_epsilon`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.config import FedmedConfig
from fedmed.privacy.accounting import StepHistory
from fedmed.privacy.dpsgd import DPSGD, Plan, plan


@dataclass
class HospitalPrivacy:
    plan: Plan
    history: StepHistory  # this run's DP rounds
    budget: float  # the most epsilon it spends in this run, as the server sets it (0: no limit)
    lifetime: StepHistory | None = None  # a real hospital: every DP round on this data, over all runs, with the dataset's accountant
    lifetime_cap: float = 0.0  # its own policy's `site.max_epsilon` (0: no limit)
    lifetime_delta: float = 0.0  # the delta the lifetime sum is taken at: the dataset's, not the run's

    @classmethod
    def load(
        cls, cfg: FedmedConfig, n: int, spent: list[tuple[float, float, int]], budget: float,
        lifetime: StepHistory | None = None, lifetime_cap: float = 0.0, lifetime_delta: float = 0.0,
    ) -> HospitalPrivacy:
        """`spent`: this hospital's earlier DP rounds in the run (from its ledger);
        `lifetime`: all its DP rounds on this data in any run (from its budget ledger)."""
        history = StepHistory(cfg.privacy.accountant)
        for sigma, rate, steps in spent:
            history.add(sigma, rate, steps)
        # The run's settings and data are the same every round: so is the sigma it trained with.
        calibrated = spent[-1][0] if spent else None
        return cls(plan(cfg, n, calibrated), history, budget, lifetime, lifetime_cap, lifetime_delta)

    def refusal(self) -> str | None:
        """Why this hospital will not train this round, if it will not."""
        p = self.plan
        if self.budget:
            after = self.history.epsilon_after(p.sigma, p.rate, p.steps_per_round, p.delta)
            if after > self.budget:
                return (
                    f"privacy budget: another round would bring epsilon from {self.history.epsilon(p.delta):.3f} "
                    f"to {after:.3f}, above this hospital's budget of {self.budget:g}"
                )
        if self.lifetime is not None and self.lifetime_cap:
            after = self.lifetime.epsilon_after(p.sigma, p.rate, p.steps_per_round, self.lifetime_delta)
            if after > self.lifetime_cap:
                return (
                    f"lifetime privacy budget: another round would bring this hospital's epsilon on this data, over all runs, "
                    f"from {self.lifetime_epsilon():.3f} to {after:.3f} (at delta {self.lifetime_delta:.1e}), above its cap of {self.lifetime_cap:g} (site.max_epsilon)"
                )
        return None

    def lifetime_epsilon(self) -> float:
        return self.lifetime.epsilon(self.lifetime_delta) if self.lifetime is not None else 0.0

    def dpsgd(self) -> DPSGD:
        """This round's DP-SGD, for the training loop."""
        return DPSGD(self.plan)

    def spend(self, steps: int) -> None:
        for history in (self.history, self.lifetime):
            if history is not None:
                history.add(self.plan.sigma, self.plan.rate, steps)

    def metrics(self) -> dict[str, float | int]:
        """The same keys in every reply: cumulative over every round this hospital trained."""
        return {
            "dp-epsilon": self.history.epsilon(self.plan.delta),
            "dp-delta": self.plan.delta,
            "dp-sigma": self.plan.sigma,
            "dp-sample-rate": self.plan.rate,
            "dp-steps": self.history.steps,
            "dp-max-grad-norm": self.plan.max_grad_norm,
            "dp-budget": self.budget,
        }

