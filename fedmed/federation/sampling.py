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

from fedmed.config import share
from fedmed.errors import FedmedError
from fedmed.run import interrupt

TRAIN, EVALUATE = 1, 2  # random streams: who trains and who evaluates are drawn independently
POLL_S = 0.5


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


def seats(grid: Grid, wanted: int, timeout: float, advice: str) -> list[int]:
    """A simulation's nodes, in the order the engine registered them. A simulated node
    plays whichever hospital a request names (`wire.HOSPITAL`), so any number of nodes
    serves a federation of any size (a few nodes play several hospitals a round).

    The engine registers its nodes as the ServerApp starts: this takes them once
    `wanted` are there (as many as `fedmed simulate` starts) or their number has held
    for a moment (a `flwr run` federation of another size; their number changes speed
    only, never results). With none after `timeout` seconds, one line and `advice`."""
    deadline = time.monotonic() + timeout
    nodes, steady_since = list(grid.get_nodes()), time.monotonic()
    while len(nodes) < wanted:
        if nodes and time.monotonic() - steady_since >= POLL_S:
            break
        if not nodes and time.monotonic() >= deadline:
            raise FedmedError(f"no SuperNode joined the federation in {timeout:g} s (simulation.node_timeout): {advice}")
        time.sleep(0.05)
        now = list(grid.get_nodes())
        if len(now) != len(nodes):
            nodes, steady_since = now, time.monotonic()
    return [node.node_id for node in sorted(nodes, key=lambda node: (node.registered_at, node.node_id))]


def connected(grid: Grid, roster: dict[int, str], needed: int) -> dict[int, str]:
    """The hospitals of `roster` (node id -> name) whose nodes are connected, once at
    least `needed` are: a deployment's hospitals connect when they connect, and the
    server waits as long as it takes (`fedmed server start` says it is waiting)."""
    while True:
        interrupt.check()  # `fedmed server start` stops the run while it waits
        online = set(grid.get_node_ids())
        present = {node: name for node, name in roster.items() if node in online}
        if len(present) >= needed:
            return present
        time.sleep(POLL_S)
