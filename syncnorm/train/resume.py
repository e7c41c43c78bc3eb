"""Resuming a run: restore its state from the checkpoint ``--resume`` names (``auto``: the newest good one)."""

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.config import to_dict


def _flatten(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def restore(run, resume: str) -> None:
    """Phase 2 of a run (with ``--resume``): every rank reads the file rank 0 chose (or all stop, see
    :func:`syncnorm.train.checkpoint.agree_on_resume`) and
    restores ``run``'s model, optimizer, scheduler, RNG state and metrics so far (``run`` is a
    :class:`syncnorm.train.loop.Run`)."""
    run_dir = run.cfg.output_dir
    found = ckpt.agree_on_resume(resume, run_dir, run.info, run.reporter.warn)
    if found is None:
        run.reporter.warn(f"--resume auto: no checkpoint in {run_dir}; starting from epoch 1")
        return
    path, saved = found
    ckpt.check_model_state(run.model_without_ddp, saved["model"], path)
    run.model_without_ddp.load_state_dict(saved["model"])
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
        if run.scheduler is not None and saved["scheduler"]:
            run.scheduler.load_state_dict(saved["scheduler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ckpt.CheckpointError(f"checkpoint {path}: optimizer/scheduler state does not fit "
                                   f"this config ({error})") from None
    ckpt.set_rng_state(saved["rng"])
    run.metrics, run.start_epoch, run.resumed_from = list(saved["metrics"]), int(saved["epoch"]) + 1, path
    old, new = _flatten(saved["config"]), _flatten(to_dict(run.cfg))
    changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in ("train.epochs", "output_dir")]
    if changed:
        run.reporter.warn(f"resuming with a config that differs from the checkpoint's: {', '.join(changed)}")
