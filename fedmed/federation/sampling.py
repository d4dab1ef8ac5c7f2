"""Which hospitals a round asks, and which Flower node each hospital is.

Hospitals are drawn from the run seed and the round over their names, never over
Flower's node ids (random in a simulation, assigned at enrolment in a deployment), so a
seeded run that asks a share of the hospitals each round repeats exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.serverapp import Grid

from fedmed.data.demo import hospital_name
from fedmed.errors import FedmedError

TRAIN, EVALUATE = 1, 2  # random streams: who trains and who evaluates are drawn independently
POLL_S = 0.5


def draw(names: Iterable[str], fraction: float, seed: int, server_round: int, stream: int) -> list[str]:
    """`fraction` of `names` (at least one), drawn from (seed, round, stream); sorted."""
    pool = sorted(names)
    k = min(len(pool), max(1, round(fraction * len(pool))))
    if k == len(pool):
        return pool
    picked = np.random.default_rng([seed, server_round, stream]).choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in picked)


def simulated_roster(grid: Grid, hospitals: int, timeout: float, setting: str) -> dict[int, str]:
    """Node id -> hospital name in a simulation. Flower's engine registers its nodes in
    partition order (node i has `partition-id` i, and so hospital i's data), each with its
    registration time; the replies say which hospital answered, and a reply under another
    name than its node's here stops the run (`Recording._hospital`).

    Waits `timeout` seconds for `hospitals` nodes, then fails naming `setting`, the
    setting that sizes the federation (too few SuperNodes would make every round wait)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_nodes())) < hospitals:
        if time.monotonic() >= deadline:
            raise FedmedError(
                f"the federation has {len(nodes)} SuperNode(s) but data.hospitals = {hospitals}, and no more came in {timeout:g} s: "
                f"start it with one SuperNode per hospital ({setting}) or lower data.hospitals"
            )
        time.sleep(POLL_S)
    ordered = sorted(nodes, key=lambda node: (node.registered_at, node.node_id))[:hospitals]
    return {node.node_id: hospital_name(i) for i, node in enumerate(ordered)}


def connected(grid: Grid, roster: dict[int, str], needed: int, waiting: Callable[[int], None] | None = None) -> dict[int, str]:
    """The hospitals of `roster` whose nodes are connected, once at least `needed` are
    (a deployment's hospitals connect when they connect: this waits as long as it takes,
    calling `waiting(connected)` every few seconds)."""
    said = 0.0
    while True:
        online = set(grid.get_node_ids())
        present = {node: name for node, name in roster.items() if node in online}
        if len(present) >= needed:
            return present
        if waiting is not None and time.monotonic() - said >= 10:
            waiting(len(present))
            said = time.monotonic()
        time.sleep(POLL_S)
