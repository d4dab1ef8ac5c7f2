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


def print_classes(console: Console, test: dict, classes: tuple[str, ...]) -> None:
    """The final model on the global test set, class by class: precision, recall, F1."""
    from rich.table import Table

    if "per_class_precision" not in test:
        return
    table = Table(title="global test set, by class", title_justify="left")
    for column in ("class", "precision", "recall", "F1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, *values in zip(classes, test["per_class_precision"], test["per_class_recall"], test["per_class_f1"], strict=True):
        table.add_row(name, *("-" if v is None else f"{v:.3f}" for v in values))
    console.print(table)
