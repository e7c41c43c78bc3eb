"""Checks before the first training step, for what would otherwise fail (or silently differ) later.

:func:`check_launch_environment` runs first in ``launch/train.py``: a torchrun environment that is
only half there (``WORLD_SIZE`` without ``RANK``, ...) is one line, not torch's error from inside
``init_process_group``. :func:`check_run` runs once the model is built: a per-rank batch of 1 that
reaches a BatchNorm layer in training is one line before any step, and ``norm=syncbn`` in one process
says once that nothing syncs.
"""

import copy
import os
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from syncnorm import distributed as launchers
from syncnorm.train.errors import ConfigError
from syncnorm.train.models import has_sync_batchnorm, to_plain

# What torchrun sets for every worker (it also sets LOCAL_WORLD_SIZE, GROUP_RANK, ...). MASTER_ADDR and
# MASTER_PORT alone do not make a torchrun environment: cluster shells often export them.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchEnvironmentError(ConfigError):
    """The process's torchrun or SLURM variables do not describe a process group; every process says it
    (a process with ``RANK=1`` would otherwise stay silent, as only rank 0 prints)."""

    every_rank = True


def check_launch_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """Take SLURM's ranks as torchrun's, then refuse a torchrun environment that is half set, in one
    line (:class:`LaunchEnvironmentError`).

    Under ``srun`` without torchrun, the torchrun variables that SLURM's describe are written to
    ``os.environ`` (only checked, when ``environ`` is given). Then: none of ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` set: one plain process. Any of them set: ``RANK`` and ``WORLD_SIZE`` must be (integers, ``0 <= RANK < WORLD_SIZE``), and with ``WORLD_SIZE > 1`` also
    ``MASTER_ADDR`` and ``MASTER_PORT``. Inside a process group that already exists (tests) nothing
    is checked.

    Example::

        >>> check_launch_environment({"WORLD_SIZE": "2"})
        Traceback (most recent call last):
        ...
        LaunchEnvironmentError: torchrun's environment is half set: WORLD_SIZE=2, but RANK, MASTER_ADDR, ...
    """
    if dist.is_available() and dist.is_initialized():
        return
    env = os.environ if environ is None else environ
    try:
        slurm = launchers.torchrun_environment(env)
    except launchers.LaunchEnvironmentError as error:
        raise LaunchEnvironmentError(str(error)) from None
    if environ is None:
        os.environ.update(slurm)
    env = {**env, **slurm}
    names = dict.fromkeys(RANK_VARIABLES + GROUP_VARIABLES)  # in order, once each
    present = {name: env[name] for name in names if env.get(name, "") != ""}
    if not any(name in present for name in RANK_VARIABLES):
        return
    fix = ("start it with torchrun (torchrun --nproc_per_node=N launch/train.py ...), or unset "
           f"{', '.join(n for n in RANK_VARIABLES if n in present)} to train in one plain process")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name in present:
            try:
                values[name] = int(present[name])
            except ValueError:
                raise LaunchEnvironmentError(f"environment variable {name}: expected an integer "
                                             f"(got {present[name]!r}); {fix}") from None
    needed = ["RANK", "WORLD_SIZE"] + (["MASTER_ADDR", "MASTER_PORT"] if values.get("WORLD_SIZE", 1) > 1 else [])
    missing = [name for name in needed if name not in present]
    if missing:
        given = ", ".join(f"{name}={value}" for name, value in present.items())
        raise LaunchEnvironmentError(f"torchrun's environment is half set: {given}, but {', '.join(missing)} "
                                     f"{'is' if len(missing) == 1 else 'are'} not set (expected "
                                     f"{', '.join(needed)} together, as torchrun sets them); {fix}")
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise LaunchEnvironmentError(f"environment variable RANK: expected 0 <= RANK < WORLD_SIZE="
                                     f"{values['WORLD_SIZE']} (got {values['RANK']}); {fix}")


def check_run(run) -> None:
    """The check once ``run`` (a :class:`syncnorm.train.loop.Run`) has its model, before the run
    directory is touched: the per-rank batch against the BatchNorm layers."""
    check_batch_norm_batch(run.model_without_ddp, run.cfg.train.batch_size, run.data.shape, run.info.world_size,
                           dtype=next(run.model_without_ddp.parameters()).dtype, device=run.info.device)


def say_if_nothing_syncs(run) -> None:
    """One warning when ``norm=syncbn`` runs in one process: the layers compute plain BatchNorm over
    this process's batch, and the global batch is the per-rank batch (people expect the 2-rank one)."""
    cfg, info = run.cfg, run.info
    if info.world_size == 1 and has_sync_batchnorm(run.model_without_ddp):
        run.reporter.warn(f"model.norm=syncbn in one process: nothing syncs (there are no other ranks), each "
                          f"layer is plain BatchNorm over this process's batch of {cfg.train.batch_size}; to "
                          f"sync, run under torchrun --nproc_per_node=N")


# The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): SGD's lr 0.1 per 256 samples of
# global batch. A run whose lr is more than LR_MARGIN times what the rule gives for its global batch is warned.
LINEAR_SCALING_LR, LINEAR_SCALING_BATCH, LR_MARGIN = 0.1, 256, 16


def small_batch_warning(lr: float, batch_size: int, world_size: int, grad_accum: int = 1) -> Optional[str]:
    """The warning for an lr far above the linear scaling rule's for the global batch, or None.

    Measured here (LeNet, mnist5k, a global batch of 3 samples, 600 steps, as ``--nproc_per_node=3 --set
    train.batch_size=1`` syncs it): lr 0.1 ended at chance (10.00 % test accuracy), the suggested 0.02 at
    65.20 %, 0.009 at 74.20 %."""
    global_batch = batch_size * world_size * grad_accum
    scaled = LINEAR_SCALING_LR * global_batch / LINEAR_SCALING_BATCH
    if lr <= LR_MARGIN * scaled:
        return None
    return (f"train.lr={lr:g} is high for a global batch of {global_batch} ({world_size} rank(s) x {batch_size}"
            f"{f' x {grad_accum} micro-batches' if grad_accum > 1 else ''}): the linear scaling rule (lr "
            f"{LINEAR_SCALING_LR:g} per {LINEAR_SCALING_BATCH} samples) gives {scaled:.2g}, and such a run may stay at "
            f"chance; lower it (--set train.lr={LR_MARGIN * scaled:.1g}) or raise train.batch_size")


def say_if_the_batch_is_small_for_the_lr(run) -> None:
    """One warning when ``train.lr`` is far above the linear scaling rule's for the global batch."""
    t = run.cfg.train
    text = small_batch_warning(t.lr, t.batch_size, run.info.world_size, t.grad_accum)
    if text:
        run.reporter.warn(text)


def check_batch_norm_batch(model: nn.Module, batch_size: int, in_shape, world_size: int,
                           dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> None:
    """Raise :class:`ConfigError` when a training batch of ``batch_size`` per rank would reach a
    BatchNorm layer with a single value per channel (``BatchNorm1d`` on one sample): torch raises
    that at the first step, deep in the model. Synced layers over several ranks see
    ``batch_size * world_size`` values and pass.

    The check runs ``model``'s copy forward on one zero sample (only when ``batch_size == 1``), so it
    finds exactly the layers torch would reject; the model and the RNG state are left untouched."""
    if batch_size > 1 or (world_size > 1 and has_sync_batchnorm(model)):
        return
    probe = to_plain(copy.deepcopy(model)).train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            probe(torch.zeros(1, *in_shape, dtype=dtype, device=device))
    except ValueError as error:
        if "more than 1 value per channel" not in str(error):
            raise
        where = "one process" if world_size == 1 else "each rank (norm=bn does not sync)"
        raise ConfigError(f"train.batch_size: expected at least 2 samples per BatchNorm batch in training (got 1 "
                          f"in {where}: a BatchNorm layer would see one value per channel); use --set "
                          f"train.batch_size=2 or more, or model.norm=syncbn on 2 or more ranks, or "
                          f"model.norm=gn") from None
