"""A hospital's side of sample-level DP: its plan, the privacy it has spent (read back
from its own signed ledger, so it survives restarts of the node and of the server, in
simulation and on a real node alike), and its budget, which it enforces itself before
training."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.config import FedmedConfig
from fedmed.privacy.accounting import StepHistory
from fedmed.privacy.dpsgd import DPSGD, Plan, plan


def budget(cfg: FedmedConfig, site: str, own: float = 0.0) -> float:
    """The most epsilon this hospital spends (0: no limit): the stricter of its own
    policy's `site.max_epsilon` and what the server sets for it (its entry in
    `privacy.budgets`, else `privacy.budget`)."""
    theirs = cfg.privacy.budget_for(site)
    return min(b for b in (own, theirs) if b) if (own or theirs) else 0.0


@dataclass
class HospitalPrivacy:
    plan: Plan
    history: StepHistory
    budget: float

    @classmethod
    def load(cls, cfg: FedmedConfig, site: str, n: int, spent: list[tuple[float, float, int]], own_budget: float = 0.0) -> HospitalPrivacy:
        """`spent`: this hospital's earlier DP rounds in the run (from its ledger)."""
        history = StepHistory(cfg.privacy.accountant)
        for sigma, rate, steps in spent:
            history.add(sigma, rate, steps)
        return cls(plan(cfg, n), history, budget(cfg, site, own_budget))

    def refusal(self) -> str | None:
        """Why this hospital will not train this round, if it will not."""
        if not self.budget:
            return None
        after = self.history.epsilon_after(self.plan.sigma, self.plan.rate, self.plan.steps_per_round, self.plan.delta)
        if after <= self.budget:
            return None
        return (
            f"privacy budget: another round would bring epsilon from {self.history.epsilon(self.plan.delta):.3f} "
            f"to {after:.3f}, above this hospital's budget of {self.budget:g}"
        )

    def dpsgd(self) -> DPSGD:
        """This round's DP-SGD, for the training loop."""
        return DPSGD(self.plan)

    def spend(self, steps: int) -> None:
        self.history.add(self.plan.sigma, self.plan.rate, steps)

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
