"""A hospital's side of sample-level DP: its plan, its ledger (kept in the node's state,
so it survives from round to round in simulation and on a real node alike), and its
budget, which it enforces itself before training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context

from fedmed.config import FedmedConfig, parse_budgets
from fedmed.privacy.accounting import Ledger
from fedmed.privacy.dpsgd import Plan, plan

LEDGER_STATE = "dp-ledger"  # in the node's context.state
NODE_BUDGET = "privacy.budget"  # a real node's own budget, from `flower-supernode --node-config`


def budget(cfg: FedmedConfig, site: str, node_config: dict[str, Any]) -> float:
    """The most epsilon this hospital spends (0: no limit): its node's own setting first,
    then its entry in `privacy.budgets`, then `privacy.budget`."""
    if NODE_BUDGET in node_config:
        return float(node_config[NODE_BUDGET])
    return parse_budgets(cfg.privacy.budgets).get(site, cfg.privacy.budget) if cfg.privacy.budgets else cfg.privacy.budget


def policy_refusal(cfg: FedmedConfig, node_config: dict[str, Any]) -> str | None:
    """A node with its own budget is a hospital that requires DP-SGD with secret noise,
    whatever the server asks for."""
    if NODE_BUDGET not in node_config:
        return None
    if cfg.privacy.mode != "sample":
        return f"this hospital requires sample-level DP (its own privacy.budget); the server asked for privacy.mode = {cfg.privacy.mode}"
    if cfg.privacy.reproducible:
        return "this hospital refuses privacy.reproducible: noise drawn from the run's seed could be removed by anyone who has it"
    return None


@dataclass
class HospitalPrivacy:
    plan: Plan
    ledger: Ledger
    budget: float

    @classmethod
    def load(cls, cfg: FedmedConfig, context: Context, site: str, n: int) -> HospitalPrivacy:
        record = context.state[LEDGER_STATE] if LEDGER_STATE in context.state else None
        ledger = Ledger.from_record(cfg.privacy.accountant, dict(record) if record is not None else None)
        return cls(plan(cfg, n), ledger, budget(cfg, site, dict(context.node_config)))

    def refusal(self) -> str | None:
        """Why this hospital will not train this round, if it will not."""
        if not self.budget:
            return None
        after = self.ledger.epsilon_after(self.plan.sigma, self.plan.rate, self.plan.steps_per_round, self.plan.delta)
        if after <= self.budget:
            return None
        return (
            f"privacy budget: another round would bring epsilon from {self.ledger.epsilon(self.plan.delta):.3f} "
            f"to {after:.3f}, above this hospital's budget of {self.budget:g}"
        )

    def spend(self, steps: int, context: Context) -> None:
        self.ledger.add(self.plan.sigma, self.plan.rate, steps)
        context.state[LEDGER_STATE] = ConfigRecord(self.ledger.to_record())

    def metrics(self) -> dict[str, float | int]:
        """The same keys in every reply: cumulative over every round this hospital trained."""
        return {
            "dp-epsilon": self.ledger.epsilon(self.plan.delta),
            "dp-delta": self.plan.delta,
            "dp-sigma": self.plan.sigma,
            "dp-sample-rate": self.plan.rate,
            "dp-steps": self.ledger.steps,
            "dp-max-grad-norm": self.plan.max_grad_norm,
            "dp-budget": self.budget,
        }
