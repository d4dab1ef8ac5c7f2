"""Which hospitals a round asks, and which nodes ask them.

Hospitals are drawn from the run seed and the round over their names, never over
Flower's node ids (random in a simulation, assigned at enrolment in a deployment), so a
seeded run that asks a share of the hospitals each round repeats exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.serverapp import Grid

from fedmed.errors import FedmedError

TRAIN, EVALUATE = 1, 2  # random streams: who trains and who evaluates are drawn independently
POLL_S = 0.5


def share(hospitals: int, fraction: float) -> int:
    """How many of `hospitals` a round asks for `fraction` (at least one)."""
    return min(hospitals, max(1, round(fraction * hospitals)))


def draw(names: Iterable[str], fraction: float, seed: int, server_round: int, stream: int) -> list[str]:
    """`share` of `names`, drawn from (seed, round, stream); sorted."""
    pool = sorted(names)
    k = share(len(pool), fraction) if pool else 0
    if k == len(pool):
        return pool
    picked = np.random.default_rng([seed, server_round, stream]).choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in picked)


def seats_needed(hospitals: int, fraction_train: float, fraction_evaluate: float) -> int:
    """Simulated nodes for `fedmed simulate` to start: one per hospital asked at once, so
    each request of an exchange goes to a node of its own. Every hospital where all train
    and evaluate (one message each per round); otherwise the larger share."""
    if fraction_train == 1.0 and fraction_evaluate == 1.0:
        return hospitals
    return max(share(hospitals, fraction_train), share(hospitals, fraction_evaluate) if fraction_evaluate else 0)


def seats(grid: Grid, timeout: float, setting: str) -> list[int]:
    """A simulation's nodes, in the order the engine registered them. A simulated node
    plays whichever hospital a request names (`wire.HOSPITAL`), so any number of nodes
    serves a federation of any size (a few nodes play several hospitals a round); with
    as many nodes as hospitals, node i (partition i) plays hospital i.

    Waits `timeout` seconds for a first node, then fails naming `setting`."""
    deadline = time.monotonic() + timeout
    while not (nodes := list(grid.get_nodes())):
        if time.monotonic() >= deadline:
            raise FedmedError(f"no SuperNode joined the federation in {timeout:g} s (simulation.node_timeout): {setting}")
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # nodes register together: the others a moment (their number changes speed only, never results)
    nodes = list(grid.get_nodes())
    return [node.node_id for node in sorted(nodes, key=lambda node: (node.registered_at, node.node_id))]


def connected(grid: Grid, roster: dict[int, str], needed: int) -> dict[int, str]:
    """The hospitals of `roster` (node id -> name) whose nodes are connected, once at
    least `needed` are: a deployment's hospitals connect when they connect, and the
    server waits as long as it takes (`fedmed server start` says it is waiting)."""
    while True:
        online = set(grid.get_node_ids())
        present = {node: name for node, name in roster.items() if node in online}
        if len(present) >= needed:
            return present
        time.sleep(POLL_S)
