"""One line per round in the terminal: round, time, global accuracy."""

from __future__ import annotations

import time

from rich.console import Console


class RoundReporter:
    def __init__(self, total_rounds: int, title: str) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.total = total_rounds
        self.start = time.time()
        self.last = self.start
        self.console.print(f"[bold]{title}[/bold]")

    def round_done(self, rnd: int, test: dict, extra: str = "") -> tuple[float, float]:
        """Print the round's line; returns (seconds this round, seconds since start)."""
        now = time.time()
        took, elapsed = now - self.last, now - self.start
        self.last = now
        width = len(str(self.total))
        self.console.print(
            f"round {rnd:>{width}}/{self.total}  {took:6.1f}s  (total {elapsed:6.1f}s)  "
            f"global test acc {test['accuracy']:.3f}  loss {test['loss']:.3f}{extra}"
        )
        return took, elapsed
