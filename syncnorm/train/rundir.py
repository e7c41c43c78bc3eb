"""The run directory (``output_dir``): the checks before a run, and what is written there.

Rank 0 writes ``config.yaml`` (the config of the run), ``metrics.jsonl`` (one JSON row per epoch) and
the ``ckpt_epoch{N}.pt`` files (:mod:`syncnorm.train.checkpoint`); every rank writes its own
``logs/rank{N}.log``.
"""

import json
import os
import tempfile
from typing import Any, Callable, Dict, List

import yaml

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.errors import ConfigError


def log_path(run_dir: str, rank: int) -> str:
    """Rank ``rank``'s log file."""
    return os.path.join(run_dir, "logs", f"rank{rank}.log")


def check_writable(run_dir: str) -> None:
    """Create ``run_dir`` if needed and write a probe file in it: a file in the way, a read-only file
    system or an unwritable parent becomes one :class:`ConfigError` line, before any training work."""
    fix = "pick a writable directory with --set output_dir=PATH"
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"output_dir {run_dir}: expected a directory (got a file); {fix}")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        where = f" ({error.filename})" if error.filename and error.filename != run_dir else ""
        raise ConfigError(f"output_dir {run_dir}: cannot create it or write in it: {reason}{where}; {fix}") from None


def check_fresh(run_dir: str) -> None:
    """Refuse to start a fresh run over an earlier run's checkpoints (one :class:`ConfigError` line)."""
    found = ckpt.list_checkpoints(run_dir) if os.path.isdir(run_dir) else []
    if found:
        names = ", ".join(os.path.basename(path) for _, path in found)
        raise ConfigError(f"output_dir {run_dir} holds an earlier run's checkpoints ({names}): continue it with "
                          f"--resume auto, replace them with --overwrite, or pick another --set output_dir=PATH")


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, "metrics.jsonl")


def prepare(run_dir: str, config: Dict[str, Any], metrics: List[Dict[str, Any]], fresh: bool,
            warn: Callable[[str], None]) -> None:
    """Rank 0: create the run dir, clear what an earlier fresh run or an interrupted write left, and
    write ``config.yaml`` and the ``metrics.jsonl`` so far."""
    os.makedirs(run_dir, exist_ok=True)
    stale = ckpt.remove_stale_temp_files(run_dir)
    if stale:
        warn(f"removed {stale} temp file(s) of an interrupted write from {run_dir}")
    if fresh:
        removed = ckpt.remove_checkpoints(run_dir)
        if removed:
            warn(f"fresh run: removed {removed} old checkpoint(s) from {run_dir} "
                 f"(pass --resume auto to continue a run instead)")
    ckpt.atomic_write_text(yaml.safe_dump(config, sort_keys=False), os.path.join(run_dir, "config.yaml"))
    ckpt.atomic_write_text("".join(json.dumps(m) + "\n" for m in metrics), metrics_path(run_dir))


def append_metrics(run_dir: str, row: Dict[str, Any]) -> None:
    """Rank 0: one epoch's row at the end of ``metrics.jsonl``."""
    with open(metrics_path(run_dir), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
