"""The run directory (``output_dir``): what rank 0 writes there besides the checkpoints.

``config.yaml`` (the config of the run), ``metrics.jsonl`` (one JSON row per epoch) and the
``ckpt_epoch{N}.pt`` files (:mod:`syncnorm.train.checkpoint`).
"""

import json
import os
from typing import Any, Callable, Dict, List

import yaml

from syncnorm.train import checkpoint as ckpt


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
