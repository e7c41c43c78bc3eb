"""Evaluate a saved checkpoint in this one process, with plain BatchNorm (what ``launch/eval.py`` runs)."""

import os
from typing import Any, Dict, Optional, Sequence

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.build import DTYPES, datasets_of, network_of
from syncnorm.train.config import apply_overrides, from_dict
from syncnorm.train.data import make_loaders
from syncnorm.train.distributed import one_process
from syncnorm.train.loop import evaluate
from syncnorm.train.models import to_plain
from syncnorm.train.ui import Reporter


def evaluate_checkpoint(path: str, overrides: Sequence[str] = (), reporter: Optional[Reporter] = None,
                        export: Optional[str] = None) -> Dict[str, Any]:
    """Load checkpoint ``path`` into a plain-BatchNorm model and evaluate it on the full test set, in
    this one process. ``overrides`` (``KEY=VALUE``) adjust the checkpoint's config (e.g. ``data.root``).
    ``export``: also write the plain model's ``state_dict`` there (atomically), for inference use."""
    if os.path.isdir(path):
        found = ckpt.find_resume("auto", path, (reporter or Reporter(False)).warn)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint (ckpt_epoch*.pt) in {path}")
        path, state = found
    else:
        state = ckpt.load_checkpoint(path)
    merged, _ = apply_overrides(state["config"], overrides)
    cfg = from_dict(merged, source=f"{path} config")
    dtype = DTYPES[cfg.train.dtype]
    data = datasets_of(cfg, cfg.data.download)
    model = to_plain(network_of(cfg, data)).to(dtype=dtype)  # SyncBatchNorm -> BatchNorm: a one-process model
    ckpt.check_model_state(model, state["model"], path)
    model.load_state_dict(state["model"])
    _, _, test_loader = make_loaders(data, batch_size=1, eval_batch_size=cfg.train.eval_batch_size, rank=0,
                                     world_size=1, seed=0, drop_last=False)
    result = evaluate(model, test_loader, one_process(), dtype)
    result.update(checkpoint=path, epoch=int(state["epoch"]), dataset=cfg.data.name,
                  model=cfg.model.name, norm=cfg.model.norm)
    if export:
        ckpt.atomic_save(model.state_dict(), export)
        result["export"] = export
    return result
