"""What the user sees: one :class:`Reporter`, which prints only on rank 0 (other ranks get a silent one).

During an epoch a ``rich`` progress bar shows steps, loss (rank 0's running mean), samples/s (all
ranks) and ETA; it disappears at the end of the epoch and a table row with the epoch's global metrics
takes its place. The rows of all epochs line up into one table. Nothing patches ``print``.
"""

import contextlib
import sys
from typing import Dict, Iterator, Optional, Sequence

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

# (header, metrics key, width, format)
COLUMNS = (
    ("epoch", "epoch", 5, "{}"),
    ("train loss", "train_loss", 10, "{:.4f}"),
    ("train acc", "train_acc", 9, "{:.2%}"),
    ("test acc", "test_acc", 8, "{:.2%}"),
    ("samples/s", "samples_per_s", 9, "{:,.0f}"),
    ("seconds", "seconds", 7, "{:.1f}"),
)


class Reporter:
    """Rank-0 console output. ``enabled=False`` turns every method into a no-op."""

    def __init__(self, enabled: bool = True, console: Optional[Console] = None) -> None:
        self.enabled = enabled
        self.console = console or Console(highlight=False, soft_wrap=False)
        self._header_done = False

    def info(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"warning: {text}", style="yellow", markup=False, highlight=False)

    def keys(self, pairs: Sequence) -> None:
        """One line of ``key value`` pairs, keys dimmed."""
        if self.enabled:
            text = "  ".join(f"[dim]{k}[/dim] {v}" for k, v in pairs)
            self.console.print(text, highlight=False)

    @contextlib.contextmanager
    def epoch_progress(self, epoch: int, epochs: int, steps: int) -> Iterator:
        """Context yielding ``advance(loss, samples_per_s)``, to be called once per step."""
        if not self.enabled or not self.console.is_terminal:
            yield lambda loss, samples_per_s: None
            return
        progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:,.0f} samples/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        task = progress.add_task("train", total=steps, loss=float("nan"), sps=0.0)
        with progress:
            yield lambda loss, samples_per_s: progress.update(task, advance=1, loss=loss, sps=samples_per_s)

    def epoch_row(self, metrics: Dict) -> None:
        """Print one epoch's row (the header too, before the first row)."""
        if not self.enabled:
            return
        table = Table(box=box.SIMPLE_HEAD, show_header=not self._header_done, show_edge=False, pad_edge=False)
        for header, _, width, _ in COLUMNS:
            table.add_column(header, justify="right", width=width, no_wrap=True)
        table.add_row(*(fmt.format(metrics[key]) for _, key, _, fmt in COLUMNS))
        self.console.print(table)
        self._header_done = True

    def summary(self, lines: Sequence) -> None:
        if self.enabled:
            self.console.print()
            for key, value in lines:
                self.console.print(f"[bold]{key}[/bold] {value}", highlight=False)


def error_line(text: str) -> None:
    """The launchers' one-line error report (stderr, no traceback)."""
    print(f"error: {text}", file=sys.stderr, flush=True)
