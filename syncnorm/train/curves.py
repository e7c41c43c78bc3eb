"""``curves.png``: a run's loss and accuracy per epoch, train and test, drawn from its ``metrics.jsonl``.

Rank 0 redraws it at the end of a run (finished, failed or interrupted once an epoch is done) and when
``--resume`` finds nothing left to do, so the picture always shows every epoch of ``metrics.jsonl``.
``launch/curves.py RUN_DIR`` draws it for any run directory. matplotlib comes with the ``train`` extra
(``pip install -e '.[train]'``); without it the run says so in one line and goes on.
"""

import argparse
import contextlib
import io
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.errors import ConfigError
from syncnorm.train.ui import error_line

FILE_NAME = "curves.png"
MISSING_MATPLOTLIB = "curves.png skipped: matplotlib is not installed (pip install -e '.[train]')"
# (panel title, y label, [(metrics key, legend label)], as percent)
PANELS = (
    ("loss", "cross-entropy", [("train_loss", "train"), ("test_loss", "test")], False),
    ("accuracy", "accuracy (%)", [("train_acc", "train"), ("test_acc", "test")], True),
)


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (one per epoch); :class:`ConfigError` when it is missing or
    holds a line that is not a JSON object."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: expected a run directory with a metrics.jsonl (got none); "
                          f"pass the output_dir of a run of launch/train.py")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path} line {number}: expected one JSON object per line ({error.msg})") from None
            if not isinstance(row, dict) or "epoch" not in row:
                raise ConfigError(f"{path} line {number}: expected an object with an epoch (got {line.strip()[:60]})")
            rows.append(row)
    return rows


def figure(rows: Sequence[Dict[str, Any]], title: str = ""):
    """A matplotlib figure of ``rows``: loss (left) and accuracy (right) per epoch, train and test.
    Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg", force=False)  # no display needed; a backend already chosen is kept
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=80, layout="constrained")
    epochs = [row["epoch"] for row in rows]
    for axes, (name, ylabel, series, percent) in zip(fig.subplots(1, 2), PANELS):
        for key, label in series:
            values = [row.get(key) for row in rows]
            points = [(e, 100 * v if percent else v) for e, v in zip(epochs, values) if v is not None]
            axes.plot([e for e, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
        if epochs:
            axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def draw(run_dir: str, out: Optional[str] = None) -> str:
    """Draw ``run_dir``'s ``metrics.jsonl`` to ``out`` (default ``run_dir/curves.png``), atomically,
    with the user's umask; returns the path. Raises ImportError without matplotlib,
    :class:`ConfigError` without metrics.

    Example::

        >>> draw("runs/lenet")
        'runs/lenet/curves.png'
    """
    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}: expected at least one finished epoch in metrics.jsonl (got none)")
    fig = figure(rows, title=os.path.normpath(run_dir))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    out = out or os.path.join(run_dir, FILE_NAME)
    ckpt.atomic_write_bytes(buffer.getvalue(), out)
    return out


def redraw(run_dir: str, warn: Callable[[str], None]) -> Optional[str]:
    """What a run calls (rank 0): :func:`draw` into the run directory; without matplotlib, or when it
    fails, one warning instead (a picture never stops a run). Returns the path, or None. A run with no
    finished epoch draws nothing and removes an earlier run's picture."""
    try:
        if not read_metrics(run_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(run_dir, FILE_NAME))
            return None
        return draw(run_dir)
    except ImportError:
        warn(MISSING_MATPLOTLIB)
    except Exception as error:  # a plot is a convenience: say why there is none, keep the run's result
        warn(f"curves.png not drawn: {type(error).__name__}: {error}")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``launch/curves.py RUN_DIR [--out PATH]``: exit 0 drawn, 2 a mistake (one ``error:`` line)."""
    parser = argparse.ArgumentParser(prog="launch/curves.py", description="Draw a run's loss and accuracy "
                                     "per epoch (train and test) from its metrics.jsonl into a PNG.")
    parser.add_argument("run_dir", help="the output_dir of a run, e.g. runs/lenet")
    parser.add_argument("--out", metavar="PATH", help="where to write the PNG (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        path = draw(args.run_dir, args.out)
    except ImportError:
        error_line(MISSING_MATPLOTLIB.replace("curves.png skipped: ", ""))
        return 2
    except ConfigError as error:
        error_line(str(error))
        return 2
    print(path)
    return 0
