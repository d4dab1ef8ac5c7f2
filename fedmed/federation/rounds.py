"""The round loop: Flower's `Strategy.start`, able to begin at any round (a resumed run)
and to checkpoint after each."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedmed.federation.strategy import Recording


def run_rounds(
    strategy: Recording,
    grid: Grid,
    arrays: ArrayRecord,
    rounds: range,
    timeout: float,
    config: ConfigRecord,
    after_round: Callable[[int, ArrayRecord], None],
) -> ArrayRecord:
    """Train, evaluate at the hospitals, then `after_round` (the server's own evaluation,
    outputs, checkpoint) for each round; returns the final global model."""
    for server_round in rounds:
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), grid), timeout=timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid), timeout=timeout)
        strategy.aggregate_evaluate(server_round, replies)
        after_round(server_round, arrays)
    return arrays
