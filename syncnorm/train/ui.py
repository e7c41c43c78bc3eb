"""What the user sees: one :class:`Reporter`, which prints only on rank 0 (other ranks get a silent one),
and every rank's own log file.

During an epoch a ``rich`` progress bar shows steps, loss (rank 0's running mean), samples/s (all
ranks) and ETA; it disappears at the end of the epoch and a table row with the epoch's global metrics
takes its place. The rows of all epochs line up into one table. Nothing patches ``print``. When the
output is not a terminal (a pipe, a file), there is no progress bar and lines are not wrapped.

:meth:`Reporter.with_log` gives a reporter that also writes every line it is given (start-up keys,
warnings, epoch rows, summary, the failure) to a plain-text log, on every rank, rank 0 included:
``output_dir/logs/rank{N}.log``, appended to (a resumed or restarted run continues the file).
"""

import contextlib
import copy
import os
import re
import sys
import time
from typing import Dict, Iterator, Optional, Sequence, TextIO

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
        self.console = console or default_console()
        self._header_done = False
        self.log: Optional[TextIO] = None  # this rank's log file (see with_log)
        self.log_path: Optional[str] = None

    def with_log(self, path: str, header: str = "") -> "Reporter":
        """A copy of this reporter that also appends every line to the log file ``path`` (created with
        its directory); ``header`` starts this run's part of the file. Close it with :meth:`close_log`."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        other = copy.copy(self)
        other.log = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: a crash keeps the lines
        other.log_path = path
        other.write_log(f"---- {header}" if header else "----")
        return other

    def write_log(self, text: str) -> None:
        """One line in this rank's log (nothing without one), time-stamped, markup removed."""
        if self.log is not None:
            plain = re.sub(r"\[/?(dim|bold)\]", "", text)
            self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {plain}\n")

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def info(self, text: str) -> None:
        self.write_log(text)
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.write_log(f"warning: {text}")
        if self.enabled:
            self.console.print(f"warning: {text}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    def failure(self, text: str) -> None:
        """The run's one-line failure, in the log only (the launcher prints it)."""
        self.write_log(f"error: {text}")

    def keys(self, pairs: Sequence) -> None:
        """One line of ``key value`` pairs, keys dimmed."""
        self.write_log("  ".join(f"{k} {v}" for k, v in pairs))
        if self.enabled:
            text = "  ".join(f"[dim]{k}[/dim] {v}" for k, v in pairs)
            self.console.print(text, highlight=False)

    @contextlib.contextmanager
    def epoch_progress(self, epoch: int, epochs: int, steps: int) -> Iterator:
        """Context yielding ``advance(loss, samples_per_s, data_wait=None)``, to be called once per step
        (``data_wait``: the share of the epoch's time so far spent waiting for batches)."""
        if not self.enabled or not self.console.is_terminal:
            yield lambda loss, samples_per_s, data_wait=None: None
            return
        progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} samples/s"),
            TextColumn("data wait {task.fields[wait]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        # Before the first step there is no loss and no rate yet: a dash, not "nan" and "0".
        task = progress.add_task("train", total=steps, **progress_fields(None, None))
        with progress:
            yield lambda loss, samples_per_s, data_wait=None: progress.update(
                task, advance=1, **progress_fields(loss, samples_per_s, data_wait))

    def epoch_row(self, metrics: Dict) -> None:
        """Print one epoch's row (the header too, before the first row)."""
        self.write_log("  ".join(f"{header} {fmt.format(metrics[key])}" for header, key, _, fmt in COLUMNS)
                       + (f"  data wait {metrics['data_wait']:.0%}" if "data_wait" in metrics else ""))
        if not self.enabled:
            return
        table = Table(box=box.SIMPLE_HEAD, show_header=not self._header_done, show_edge=False, pad_edge=False)
        for header, _, width, _ in COLUMNS:
            table.add_column(header, justify="right", width=width, no_wrap=True)
        table.add_row(*(fmt.format(metrics[key]) for _, key, _, fmt in COLUMNS))
        self.console.print(table)
        self._header_done = True

    def summary(self, lines: Sequence) -> None:
        """The closing ``key value`` lines. They hold commands and paths to copy: never broken into
        several lines (a terminal narrower than a line folds it on screen, a copy stays one line)."""
        for key, value in lines:
            self.write_log(f"{key} {value}")
        if self.enabled:
            self.console.print()
            for key, value in lines:
                self.console.print(f"[bold]{key}[/bold] {value}", highlight=False, soft_wrap=True)


def progress_fields(loss: Optional[float], samples_per_s: Optional[float],
                    data_wait: Optional[float] = None) -> Dict[str, str]:
    """The progress bar's loss, samples/s and data-wait texts; a dash while there is no value yet."""
    return {"loss": "-" if loss is None else f"{loss:.4f}",
            "sps": "-" if not samples_per_s else f"{samples_per_s:,.0f}",
            "wait": "-" if data_wait is None else f"{data_wait:.0%}"}


def default_console() -> Console:
    """rich's console on stdout; off a terminal (a pipe, a file) it does not wrap lines at 80 columns."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True)
    return console


def error_line(text: str) -> None:
    """The launchers' one-line error report (stderr, no traceback)."""
    print(f"error: {text}", file=sys.stderr, flush=True)
