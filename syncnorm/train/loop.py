"""The run: ``train(cfg)``, a short sequence of named phases.

``train(cfg)`` is what ``launch/train.py`` runs (through :mod:`syncnorm.train.cli`); it also runs
inside an already initialized process group (tests, benchmarks). Each phase is a function of the
:class:`Run` it fills in: :func:`set_up` (data, model, optimizer) -> :func:`restore` (from a checkpoint,
with ``--resume``) -> :func:`start` (DDP, compile, run dir, start-up lines) -> :func:`train_epochs` ->
:func:`finish` (summary).

Per epoch (:mod:`syncnorm.train.epoch` holds the step, the epoch and the evaluation):
``sampler.set_epoch``, :func:`train_one_epoch`, :func:`evaluate`, one row on screen and in the rank's
log, one line in ``metrics.jsonl``, one checkpoint (rank 0), then the ``on_epoch_end`` callbacks.
Raising from a callback stops the run after the last checkpoint written, as a kill would (the tests use
this to interrupt runs).

Failures of a started run raise :class:`TrainingError`: :class:`NonFiniteLossError`,
:class:`CollectiveError` when a collective times out or loses its peer (see :mod:`syncnorm.train.failures`),
:class:`UnsupportedOperationError`, :class:`Interrupted` (Ctrl-C).
"""

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from syncnorm._compat import destroy_process_group
from syncnorm.precise import update_bn_stats
from syncnorm.train import checkpoint as ckpt
from syncnorm.train import curves, failures, rundir
from syncnorm.train.build import (DTYPES, compile_model, load_data, make_model, make_optimizer, make_scheduler,
                                  make_step_settings)
from syncnorm.train.config import Config, to_dict
from syncnorm.train.data import make_loaders, uneven_step_samples
from syncnorm.train.distributed import (DistInfo, broadcast_buffers, expected_rank, seed_everything, setup_distributed,
                                        threads_text, wrap_ddp)
from syncnorm.train.epoch import (LoopState, StepSettings, evaluate, notify, optimizer_steps, train_one_epoch,
                                  training_step)
from syncnorm.train.errors import (CollectiveError, ConfigError, NonFiniteLossError, TrainingError,
                                   UnsupportedOperationError)
from syncnorm.train.interrupts import during_interrupt, interrupted, interrupts_deferred
from syncnorm.train.models import count_parameters, has_sync_batchnorm
from syncnorm.train.preflight import check_run, say_if_nothing_syncs, say_if_the_batch_is_small_for_the_lr
from syncnorm.train.resume import restore
from syncnorm.train.ui import Reporter

__all__ = ["CollectiveError", "LoopState", "NonFiniteLossError", "RunResult", "TrainingError", "evaluate",
           "train", "train_one_epoch", "training_step"]


@dataclass
class RunResult:
    metrics: List[Dict[str, Any]]
    model: nn.Module  # unwrapped (no DDP); SyncBatchNorm layers if norm=syncbn
    run_dir: str
    last_checkpoint: Optional[str]
    resumed_from: Optional[str] = None


@dataclass
class Run:
    """What one run holds; :func:`set_up` builds it, the later phases fill it in."""

    cfg: Config
    info: DistInfo
    reporter: Reporter
    state: LoopState
    data: Any
    loaders: tuple  # (train loader, its sampler, test loader)
    model: nn.Module  # what trains: DDP-wrapped after start() when world_size > 1
    model_without_ddp: nn.Module  # what is saved and evaluated
    optimizer: torch.optim.Optimizer
    scheduler: Any
    settings: StepSettings  # train.amp, channels_last, grad_accum, clip_grad
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 1
    resumed_from: Optional[str] = None

    @property
    def steps(self) -> int:
        """Training (optimizer) steps per epoch."""
        return optimizer_steps(len(self.loaders[0]), self.cfg.train.grad_accum, self.cfg.train.max_steps)


def train(cfg: Config, resume: Optional[str] = None, reporter: Optional[Reporter] = None,
          callbacks: Sequence = ()) -> RunResult:
    """Run the whole training described by ``cfg``; see the module docstring. Returns on every rank.

    Each rank appends what it reports to ``output_dir/logs/rank{N}.log``. A failure is raised as one
    line (:class:`TrainingError`, :class:`ConfigError`) whose ``log_path`` attribute names that log;
    Ctrl-C is raised as :class:`Interrupted`."""
    run_start = time.perf_counter()
    tag = failures.next_run_tag()
    rank, world_size = expected_rank()
    state = LoopState(run_dir=cfg.output_dir, phase="start-up")
    reporter = _open_log(reporter or Reporter(enabled=rank == 0), cfg, rank, world_size)
    info = None
    started = ended = False  # a failed or interrupted run redraws curves.png in `finally`
    try:
        state.phase = "joining the process group"
        info = setup_distributed(cfg)
        run = set_up(cfg, info, reporter, state)
        if resume:
            restore(run, resume)
        if run.start_epoch > cfg.train.epochs:
            return nothing_to_do(run)
        check_run(run)
        start(run)
        started = True
        train_epochs(run, callbacks)
        result, ended = finish(run, run_start), True
        return result
    except (TrainingError, ConfigError) as error:
        _said(error, reporter)
        raise
    except BaseException as error:  # Ctrl-C, a failed collective, or a bug (which keeps its traceback)
        if isinstance(error, KeyboardInterrupt) or during_interrupt(error):
            raise _said(interrupted(state), reporter) from None
        if not isinstance(error, Exception):
            raise
        diagnosed = _diagnose(error, cfg, info, state, tag) if info is not None else error
        if diagnosed is not error:
            raise _said(diagnosed, reporter) from error
        reporter.failure(f"{type(error).__name__}: {failures.first_line(error)} (traceback on stderr)")
        raise
    finally:
        if started and not ended and rank == 0:
            curves.redraw(cfg.output_dir, reporter.warn)
        reporter.close_log()
        if info is not None and info.owns_group and dist.is_initialized():
            destroy_process_group()  # without the gloo teardown deadlock of torch <= 2.6


def _said(error: Exception, reporter: Reporter) -> Exception:
    """``error`` (one line) written to this rank's log, with ``log_path`` naming that log."""
    reporter.failure(str(error))
    error.log_path = reporter.log_path
    return error


def _open_log(reporter: Reporter, cfg: Config, rank: int, world_size: int) -> Reporter:
    """``reporter`` that also writes this rank's log (``reporter`` as is, with a warning, if it cannot)."""
    path = rundir.log_path(cfg.output_dir, rank)
    try:
        return reporter.with_log(path, f"rank {rank} of {world_size}, pid {os.getpid()}, {sys.executable}")
    except OSError as error:
        print(f"warning: rank {rank}: cannot write its log {path} ({error.strerror}); going on without it",
              file=sys.stderr, flush=True)
        return reporter


def _diagnose(error: Exception, cfg: Config, info: DistInfo, state: LoopState, tag: str) -> Exception:
    """What to raise for an unexpected ``error``: one line when it is an unsupported backend operation
    or a failed collective; else ``error`` itself (a bug: it keeps its traceback)."""
    if info.world_size > 1 and failures.is_unsupported_backend_operation(error):
        return UnsupportedOperationError(failures.describe_unsupported_operation(error, info, state))
    if info.world_size > 1 and failures.is_collective_failure(error):
        timeout_s = failures.group_timeout(cfg.dist.timeout_s)
        logs_dir = os.path.dirname(rundir.log_path(cfg.output_dir, 0))
        return CollectiveError(failures.describe_collective_failure(error, info, state, timeout_s, tag,
                                                                    logs_dir=logs_dir))
    return error


def set_up(cfg: Config, info: DistInfo, reporter: Reporter, state: LoopState) -> Run:
    """Phase 1: seed, data (agreed download), loaders, model, optimizer, scheduler."""
    t = cfg.train
    seed_everything(t.seed)
    settings = make_step_settings(cfg, info)  # before the data: a combination that cannot work is one line now
    state.phase = "data loading"
    data = load_data(cfg, info)
    loaders = make_loaders(data, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, rank=info.rank,
                           world_size=info.world_size, seed=t.seed, shuffle=t.shuffle, drop_last=t.drop_last,
                           num_workers=cfg.data.num_workers, shard=cfg.data.shard)
    model = make_model(cfg, data, info, reporter.warn)
    optimizer = make_optimizer(cfg, model)
    return Run(cfg, info, reporter, state, data, loaders, model, model, optimizer, make_scheduler(cfg, optimizer),
               settings)


def start(run: Run) -> None:
    """Phase 3: DDP, the run dir (rank 0), the start-up lines."""
    cfg, info, reporter = run.cfg, run.info, run.reporter
    run.state.phase = "model set-up (DDP)"
    model = run.model_without_ddp
    if cfg.train.compile and cfg.data.shard == "uneven":
        raise ConfigError("data.shard=uneven: expected train.compile=false (got true); syncnorm.join, which "
                          "absorbs the uneven numbers of batches, runs eager models only")
    if cfg.train.compile:
        # Compile the model, then wrap it: the model becomes one graph (no break), and DDP's own
        # bookkeeping stays eager (compiling DDP itself breaks the graph there and leaves every
        # torch layer outside the graph).
        model = compile_model(model)
    run.model = wrap_ddp(model, info)
    if info.rank == 0:
        rundir.prepare(cfg.output_dir, to_dict(cfg), run.metrics, run.resumed_from is None, reporter.warn)
    synced = has_sync_batchnorm(run.model_without_ddp) and info.world_size > 1
    scope = (f" (synced in groups of {cfg.sync.group_size} ranks)"
             if cfg.sync.group_size and cfg.sync.group_size < info.world_size else " (synced over all ranks)")
    reporter.keys([("model", f"{cfg.model.name} ({count_parameters(run.model_without_ddp):,} params)"),
                   ("norm", cfg.model.norm + (scope if synced else "")),
                   ("init", cfg.model.init)])
    reporter.keys([("data", f"{cfg.data.name} ({len(run.data.train):,} train / {len(run.data.test):,} test)"),
                   ("steps/epoch", run.steps), ("dtype", cfg.train.dtype)])
    reporter.keys([("global batch", f"{info.world_size * cfg.train.batch_size} = {info.world_size} rank(s) x "
                                    f"{cfg.train.batch_size}"),
                   ("backend", f"{info.backend} on {info.device.type}" if info.world_size > 1
                    else f"none (one process) on {info.device.type}"),
                   ("threads/rank", f"{torch.get_num_threads()} ({threads_text(cfg.dist.threads)})"),
                   ("compile", "on (torch.compile)" if cfg.train.compile else "off")])
    speed = step_settings_text(cfg)
    if speed:
        reporter.keys(speed)
    reporter.keys([("run dir", cfg.output_dir)])
    say_if_nothing_syncs(run)
    say_if_the_batch_is_small_for_the_lr(run)
    if run.resumed_from:
        reporter.info(f"resumed from {run.resumed_from} (epoch {run.start_epoch - 1} done)")
        for row in run.metrics:
            reporter.epoch_row(row)


def train_epochs(run: Run, callbacks: Sequence = ()) -> None:
    """Phase 4: the epochs from ``run.start_epoch`` to ``train.epochs``: train, evaluate, report, save."""
    t, info, state = run.cfg.train, run.info, run.state
    train_loader, sampler, test_loader = run.loaders
    dtype = DTYPES[t.dtype]
    state.metrics, state.last_checkpoint = run.metrics, run.resumed_from
    if t.compile:
        callbacks = [_CompileTimer(run.reporter), *callbacks]
    for epoch in range(run.start_epoch, t.epochs + 1):
        epoch_start = time.perf_counter()
        state.epoch = epoch
        sampler.set_epoch(epoch)
        if hasattr(run.data.train, "set_epoch"):  # imagefolder: each sample's augmentation seed
            run.data.train.set_epoch(epoch)
        with run.reporter.epoch_progress(epoch, t.epochs, run.steps) as advance:
            train_stats = train_one_epoch(run.model, train_loader, run.optimizer, info, dtype, t.max_steps,
                                          advance, callbacks, state, nan_policy=t.nan_policy,
                                          step_samples=_step_samples(run), settings=run.settings)
        if train_stats["skipped_steps"]:
            run.reporter.warn(f"epoch {epoch}: skipped {train_stats['skipped_steps']} step(s) with a non-finite "
                              f"loss (train.nan_policy=skip)")
        if run.scheduler is not None:
            run.scheduler.step()
        if t.precise_bn_batches:
            state.phase = "precise BN statistics"
            recompute_bn_stats(run, train_loader, dtype)
        state.phase = "evaluation"
        broadcast_buffers(run.model_without_ddp, info)
        test_stats = evaluate(run.model_without_ddp, test_loader, info, dtype)
        row = {"epoch": epoch, "train_loss": train_stats["train_loss"], "train_acc": train_stats["train_acc"],
               "test_loss": test_stats["test_loss"], "test_acc": test_stats["test_acc"],
               "samples_per_s": train_stats["samples"] / max(train_stats["train_seconds"], 1e-9),
               "seconds": time.perf_counter() - epoch_start, "lr": run.optimizer.param_groups[0]["lr"],
               "samples": train_stats["samples"], "skipped_steps": train_stats["skipped_steps"],
               "data_wait": train_stats["data_wait"]}
        run.metrics.append(row)
        run.reporter.epoch_row(row)
        with interrupts_deferred():  # the row and the checkpoint are written whole, and state says so
            state.last_checkpoint = _save_epoch(run, epoch, row)
        state.phase = "end of epoch"
        notify(callbacks, "on_epoch_end", state)


def step_settings_text(cfg: Config) -> List[tuple]:
    """The start-up line's pairs for the speed settings that are not their defaults (none by default)."""
    t = cfg.train
    pairs = [("amp", t.amp if t.amp != "off" else None),
             ("channels_last", "on" if t.channels_last else None),
             ("grad_accum", f"{t.grad_accum} (global batch per step x {t.grad_accum})" if t.grad_accum > 1 else None),
             ("clip_grad", t.clip_grad)]
    return [(key, value) for key, value in pairs if value is not None]


def _step_samples(run: Run):
    """``data.shard=uneven``: samples of each step over all ranks (train_one_epoch then runs under
    syncnorm.join and weights the loss by it); None for the padded split."""
    if run.cfg.data.shard != "uneven":
        return None
    n, world, batch = len(run.data.train), run.info.world_size, run.cfg.train.batch_size
    return lambda step: uneven_step_samples(n, world, batch, step)


def recompute_bn_stats(run: Run, train_loader, dtype) -> None:
    """``train.precise_bn_batches``: exact BatchNorm statistics of the current weights over that many
    training batches per rank (``syncnorm.update_bn_stats``), so the evaluation does not see the moving
    averages taken while the weights changed. The unwrapped, uncompiled model runs (no DDP broadcast)."""
    info = run.info
    inputs = (images.to(info.device, dtype=dtype) for images, _ in train_loader)
    update_bn_stats(run.model_without_ddp, inputs, num_batches=run.cfg.train.precise_bn_batches)


class _CompileTimer:
    """Reports the first training step's time once: with ``train.compile`` it is mostly compiling."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter, self.start = reporter, time.perf_counter()

    def on_step(self, state: LoopState) -> None:
        if self.start is not None:
            self.reporter.info(f"compiled in {time.perf_counter() - self.start:.1f} s (torch.compile; the first "
                               f"training step's time)")
            self.start = None


def _save_epoch(run: Run, epoch: int, row: Dict[str, Any]) -> str:
    """Rank 0 appends the row to ``metrics.jsonl`` and saves the checkpoint; returns its path (every rank)."""
    run_dir = run.cfg.output_dir
    if run.info.rank != 0:
        return ckpt.checkpoint_path(run_dir, epoch)
    rundir.append_metrics(run_dir, row)
    state = {
        "model": run.model_without_ddp.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else {},
        "rng": ckpt.rng_state(),
        "config": to_dict(run.cfg),
        "metrics": run.metrics,
    }
    if run.settings.scaler is not None:  # train.amp=fp16: the loss scale it has found
        state["scaler"] = run.settings.scaler.state_dict()
    return ckpt.save_checkpoint(run_dir, epoch, state, keep=run.cfg.train.keep_checkpoints)


def nothing_to_do(run: Run) -> RunResult:
    """A resumed run whose epochs are all done: say so (and how to train on); write nothing but its log
    lines and ``curves.png``."""
    done, epochs = run.start_epoch - 1, run.cfg.train.epochs
    if run.info.rank == 0:
        curves.redraw(run.cfg.output_dir, run.reporter.warn)
    run.reporter.info(f"nothing to do: epoch {done} of {epochs} done ({run.resumed_from}); to train on, add "
                      f"--set train.epochs=N with N > {done}")
    return RunResult(run.metrics, run.model_without_ddp, run.cfg.output_dir, run.resumed_from, run.resumed_from)


def _as_typed(path: str) -> str:
    """``path`` relative to the working directory when below it, else absolute."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.path.abspath(path)


def eval_command() -> str:
    """How to run ``launch/eval.py`` from here, with the Python that runs this (a bare ``python`` may be
    another one without an activated venv)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "launch", "eval.py")
    return f"{_as_typed(sys.executable)} {_as_typed(script) if os.path.exists(script) else 'launch/eval.py'}"


def finish(run: Run, run_start: float) -> RunResult:
    """Phase 5: the summary lines; the result every rank returns."""
    metrics, last_path, run_dir = run.metrics, run.state.last_checkpoint, run.cfg.output_dir
    drawn = curves.redraw(run_dir, run.reporter.warn) if run.info.rank == 0 and metrics else None
    if metrics:
        best = max(metrics, key=lambda m: m["test_acc"])
        total = time.perf_counter() - run_start
        run.reporter.summary([
            ("test accuracy", f"final {metrics[-1]['test_acc']:.2%}, best {best['test_acc']:.2%} (epoch {best['epoch']})"),
            ("total time", f"{total:.1f} s for {len(metrics) - (run.start_epoch - 1)} epoch(s) on "
                           f"{run.info.world_size} rank(s)"),
            ("run dir", f"{run_dir}/  config.yaml  metrics.jsonl  ckpt_epoch{{N}}.pt "
                        f"(last {run.cfg.train.keep_checkpoints})  logs/rank{{N}}.log"
                        + ("  curves.png" if drawn else "")),
            ("evaluate", f"{eval_command()} --checkpoint {last_path}"),
        ])
    return RunResult(metrics, run.model_without_ddp, run_dir, last_path, run.resumed_from)
