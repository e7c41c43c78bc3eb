"""Resuming a run: its own config (:func:`resumed_config`), then its state from the checkpoint
``--resume`` names (``auto``: the newest good one; :func:`restore`).

A resumed run continues the run as it was configured: the base is the run's own ``config.yaml``
(what its first start resolved, ``--set`` overrides included), not the ``--config`` file given
again. A ``--set`` on resume may change only what does not change the computation done so far
(:data:`ADJUSTABLE`: more epochs, where the data is, timeouts, threads, ...); any other ``--set`` that
contradicts the run's config is refused in one line.
"""

import math
import os
from typing import Iterable

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.config import Config, apply_overrides, from_dict, read_yaml, to_dict
from syncnorm.train.errors import ConfigError

# Keys a --set may change on resume. train.epochs extends (or ends) the run; the others say where the
# data and the run are, how long to wait, how many threads and workers, what to keep: none changes
# the epochs already trained. train.compile and train.eval_batch_size change float rounding only.
ADJUSTABLE = ("train.epochs", "output_dir", "data.root", "data.download", "data.num_workers", "dist.backend",
              "dist.timeout_s", "dist.threads", "train.keep_checkpoints", "train.eval_batch_size",
              "train.compile", "train.nan_policy")


def _flatten(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resumed_config(requested: Config, overrides: Iterable[str]) -> Config:
    """The config of a resumed run: ``requested.output_dir``'s own ``config.yaml`` with ``overrides``
    (``KEY=VALUE``) applied; ``requested`` (the ``--config`` file with ``overrides``) when the run
    directory has no ``config.yaml`` yet (its first start did not get that far).

    Raises :class:`ConfigError` (one line) for an override outside :data:`ADJUSTABLE` that contradicts
    the run's config. ``--config`` only locates the run here (with ``--set output_dir``): its other
    keys are not used.

    Example::

        >>> cfg = resumed_config(load_config("configs/lenet.yaml", ["output_dir=runs/long"]),
        ...                      ["output_dir=runs/long", "train.epochs=80"])   # runs/long had 50
    """
    overrides = list(overrides)
    saved_path = os.path.join(requested.output_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return requested
    saved = read_yaml(saved_path)
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: expected the run's config, a mapping (got {type(saved).__name__}); "
                          f"restore it, or start a fresh run with --overwrite")
    saved_cfg = from_dict(saved, source=saved_path)
    merged, origins = apply_overrides(to_dict(saved_cfg), overrides)
    merged["output_dir"] = requested.output_dir  # the run is where it was found
    cfg = from_dict(merged, source=saved_path)
    old, new = _flatten(to_dict(saved_cfg)), _flatten(to_dict(cfg))
    for key, origin in origins.items():
        changed = [k for k in new if (k == key or k.startswith(key + ".")) and new[k] != old.get(k)]
        if changed and key not in ADJUSTABLE:
            raise ConfigError(f"{origin}: the run in {requested.output_dir} was configured with {key}="
                              f"{_yaml_text(old.get(key))} ({saved_path}); --resume continues it as configured "
                              f"(a --set may change {', '.join(k for k in ADJUSTABLE if k != 'output_dir')}): drop "
                              f"this --set, or start a new run with another --set output_dir=PATH")
    return cfg


def _yaml_text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


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
        if run.settings.scaler is not None and saved.get("scaler"):
            run.settings.scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ckpt.CheckpointError(f"checkpoint {path}: optimizer/scheduler state does not fit "
                                   f"this config ({error})") from None
    ckpt.set_rng_state(saved["rng"])
    run.metrics, run.start_epoch, run.resumed_from = list(saved["metrics"]), int(saved["epoch"]) + 1, path
    old, new = _flatten(saved["config"]), _flatten(to_dict(run.cfg))
    changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in ADJUSTABLE]
    if changed:
        run.reporter.warn(f"resuming with a config that differs from the checkpoint's: {', '.join(changed)}")
    done = run.start_epoch - 1
    if done > run.cfg.train.epochs:
        raise ConfigError(f"train.epochs: expected at least {done}, the epochs this run has done ({path}) "
                          f"(got {run.cfg.train.epochs}); to train on, --set train.epochs=N with N > {done}")
    if old.get("train.epochs") != run.cfg.train.epochs:
        _stretch_schedule(run, done)


def _stretch_schedule(run, done: int) -> None:
    """``train.epochs`` changed on resume: a cosine schedule runs over the new number of epochs, the
    learning rate continuing from that curve at epoch ``done`` (the restored scheduler still counts to
    the old number; past it, its cosine would climb again)."""
    scheduler = run.scheduler
    if run.cfg.train.schedule != "cosine" or scheduler is None:
        return
    scheduler.T_max = run.cfg.train.epochs
    for group, base_lr in zip(run.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base_lr - scheduler.eta_min) * (1 + math.cos(math.pi * done /
                                                                                      scheduler.T_max)) / 2
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
