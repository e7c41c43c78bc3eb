"""The training loop: process group, model, data, SGD, metrics, checkpoints, resume.

``main(argv)`` is what ``launch/train.py`` runs (under torchrun or as one plain process);
``train(cfg)`` is the loop itself and also runs inside an already initialized process group (tests).

Per epoch: ``sampler.set_epoch``, :func:`train_one_epoch` (one :func:`training_step` per batch, then
the step callbacks), :func:`evaluate` over the whole test set (each rank its shard, counts summed with
one all_reduce), one row on screen, one line in ``metrics.jsonl``, one checkpoint (rank 0).

Hook points for later features, without restructuring:

* ``training_step`` returns the loss before ``backward``/``optimizer.step`` run in
  :func:`train_one_epoch`; between the two, :func:`nonfinite_ranks` agrees on a non-finite loss across
  ranks (one all_reduce of ``world_size`` floats per step) and ``train.nan_policy`` decides: ``stop``
  raises :class:`NonFiniteLossError` (epoch, step, ranks; no checkpoint is written for that epoch),
  ``skip`` drops the batch on every rank (no backward, no step, BatchNorm buffers restored) and counts
  it in the epoch's ``skipped_steps``.
* ``callbacks``: objects with optional ``on_step(state)`` and ``on_epoch_end(state)`` methods, where
  ``state`` is the :class:`LoopState` (epoch, step, loss, metrics so far). Raising from a callback stops
  the run after the last checkpoint written, as a kill would (the tests use this to interrupt runs).

Failures of a started run raise :class:`TrainingError` (``launch/train.py`` prints it as one line,
exit status 1): :class:`NonFiniteLossError`, and :class:`CollectiveError` when a collective times out
or loses its peer (a rank crashed, was killed, or stopped calling collectives) -- the message names
the phase, epoch and step, the process-group timeout, and the ranks that did not report the failure
themselves (found through the process group's store), i.e. the likely culprits.
"""

import argparse
import inspect
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from syncnorm.train.data import Datasets, build_datasets, make_loaders
from syncnorm.train.errors import DataError
from syncnorm.train.models import build_model, count_parameters, has_sync_batchnorm, to_plain
from syncnorm.train.ui import Reporter

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TrainingError(RuntimeError):
    """A started run cannot go on; the message is one line saying where, why and what to do."""


class NonFiniteLossError(TrainingError):
    """``train.nan_policy=stop`` met a NaN/inf loss (on any rank: all ranks raise it together)."""


class CollectiveError(TrainingError):
    """A collective timed out or lost a peer: another rank crashed, was killed, or is stuck."""
# DDP's switch for the per-forward buffer broadcast: torch 2.14 renamed broadcast_buffers.
_DDP_BUFFER_SYNC = ("forward_sync_buffers"
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")


# --------------------------------------------------------------------------- distributed setup


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    owns_group: bool  # True when this module initialized the process group (and must destroy it)


def choose_backend(requested: str) -> str:
    """``auto`` -> ``nccl`` when this process has a CUDA device, else ``gloo``."""
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise ConfigError("dist.backend: expected auto or gloo on a machine without CUDA (got 'nccl')")
    return requested


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer (got {value!r})") from None


def setup_distributed(cfg: Config) -> DistInfo:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (a plain ``python launch/train.py``) the run is one process with no group.
    If a group already exists (tests), it is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
        local_rank = _env_int("LOCAL_RANK", rank)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        owns = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        backend = choose_backend(cfg.dist.backend)
        owns = world > 1
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if owns:
            try:
                init_group(backend, rank, world, timedelta(seconds=cfg.dist.timeout_s), local_world)
            except Exception as error:
                if not is_collective_failure(error):
                    raise
                raise CollectiveError(
                    f"rank {rank}: joining the process group of {world} ranks failed within "
                    f"dist.timeout_s={cfg.dist.timeout_s:g}: not every rank started, or the rendezvous address "
                    f"is unreachable ({_first_line(error)})") from None
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, str(backend), device, owns)


def init_group(backend: str, rank: int, world: int, timeout: timedelta, local_world: int = 0) -> None:
    """``init_process_group`` from torchrun's environment.

    When every rank runs on this machine (``local_world == world``) and ``GLOO_SOCKET_IFNAME`` is not
    set, gloo is put on the loopback interface (Linux ``lo``): by default it listens on the address
    the host name resolves to, which may be a network interface.

    Under torchrun with the c10d rendezvous the agent hosts one TCPStore for the workers and keeps it
    across restarts (pytorch/pytorch#135712), so restarted workers can read the previous attempt's keys
    -- e.g. gloo's peer addresses, whose sockets died with the old workers ("Connection refused" at
    init, and the restart is lost). Keys get a per-attempt prefix here (torchrun restarts the whole
    worker group, so every rank has the same ``TORCHELASTIC_RESTART_COUNT``).
    """
    if backend == "gloo" and local_world == world and not os.environ.get("GLOO_SOCKET_IFNAME"):
        try:
            if "lo" in [name for _, name in socket.if_nameindex()]:
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        except (AttributeError, OSError):
            pass
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and attempt is not None:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"syncnorm/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def default_threads(local_world_size: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def all_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``values`` element-wise over all ranks (one all_reduce; a no-op in one process)."""
    if info.world_size > 1:
        dist.all_reduce(values)
    return values


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (running statistics) so all ranks evaluate the saved model."""
    if info.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------- failures of collectives

# What gloo/NCCL/the store say when a peer is gone or never came (older torch: plain RuntimeError).
_COLLECTIVE_SIGNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                     "broken pipe", "connection refused", "gloo", "nccl", "socket")
_TIMEOUT_SIGNS = ("timed out", "timeout")
_failure_runs = 0  # train() calls in this process: keys of one run's failure reports stay apart


def _first_line(error: BaseException) -> str:
    """The informative part of an error: first line, without gloo's ``[file.cc:N]`` prefix, first sentence."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", line)
    line = line.split(". ")[0]
    return line if len(line) <= 200 else line[:197] + "..."


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a collective or the store raises when another rank is gone or stuck."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in _COLLECTIVE_SIGNS)


def group_timeout(default: float) -> float:
    """The default process group's timeout in seconds (``default`` when it cannot be read)."""
    try:
        group = dist.distributed_c10d._get_default_group()
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:
        return default


def silent_ranks(info: "DistInfo", tag: str, wait_s: float) -> Tuple[Optional[List[int]], List[int]]:
    """After a failed collective: report it in the process group's store and wait up to ``wait_s``
    for the other ranks to report theirs. Returns (the ranks that did not report: crashed, killed or
    stuck; the ranks that had reported before this one). (None, []) when the store cannot tell."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = f"syncnorm/failure/{tag}/"
        others = [r for r in range(info.world_size) if r != info.rank]
        earlier = [r for r in others if store.check([key + str(r)])]
        store.set(key + str(info.rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in others if not store.check([key + str(r)])]
            if not missing or time.monotonic() >= deadline:
                return missing, earlier
            time.sleep(0.05)
    except Exception:
        return None, []


def describe_collective_failure(error: BaseException, info: "DistInfo", state: "LoopState", timeout_s: float,
                                wait_s: float = 2.0) -> str:
    """One line for a failed collective: where it happened, the likely cause, the timeout, what to do."""
    where = state.phase or "training"
    if state.epoch:
        where += f" at epoch {state.epoch}" + (f", step {state.step + 1}" if state.phase == "training step" else "")
    missing, earlier = silent_ranks(info, f"{_failure_runs}", wait_s)
    timed_out = any(sign in str(error).lower() for sign in _TIMEOUT_SIGNS)
    how = (f"did not join the collective within dist.timeout_s={timeout_s:g}" if timed_out
           else "dropped its connection")
    if missing == [] and len(earlier) == info.world_size - 1:
        cause = (f"every other rank had already given up on this collective (after dist.timeout_s={timeout_s:g}) "
                 f"before this rank reached it: this rank was stuck or too slow before it; see the other "
                 f"ranks' messages")
    elif missing:
        names = ", ".join(str(r) for r in missing)
        cause = (f"rank{'s' if len(missing) > 1 else ''} {names} {how}: "
                 f"{'they' if len(missing) > 1 else 'it'} crashed, "
                 f"{'were' if len(missing) > 1 else 'was'} killed, or {'are' if len(missing) > 1 else 'is'} "
                 f"stuck before a collective (e.g. in data loading or a rank-dependent code path); see "
                 f"{'their' if len(missing) > 1 else 'its'} log")
    elif missing == []:
        cause = ("every rank failed in a collective here: the ranks call collectives in different orders "
                 "(a rank-dependent code path) or the network between them failed")
    else:
        cause = (f"another rank {how}: it crashed, was killed, or is stuck before a collective; see the "
                 f"other ranks' logs")
    return f"rank {info.rank}: a collective failed during {where}: {cause} [{_first_line(error)}]"


# --------------------------------------------------------------------------- one epoch


@dataclass
class LoopState:
    """What callbacks see."""

    epoch: int = 0
    step: int = 0
    loss: Optional[torch.Tensor] = None
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    run_dir: str = ""
    skipped_steps: int = 0  # this epoch's steps dropped by train.nan_policy=skip
    phase: str = ""  # what the loop is doing (named when a collective fails)
    last_checkpoint: Optional[str] = None


def training_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Forward one batch; return the mean loss (not yet backpropagated) and the batch's counts."""
    logits = model(inputs)
    loss = nn.functional.cross_entropy(logits, targets)
    with torch.no_grad():
        correct = (logits.argmax(1) == targets).sum()
    return {"loss": loss, "correct": correct, "count": torch.tensor(targets.numel(), device=targets.device)}


def nonfinite_ranks(loss: torch.Tensor, info: DistInfo) -> List[int]:
    """Ranks whose ``loss`` is NaN or infinite, the same list on every rank (one all_reduce of
    ``world_size`` floats; none in one process)."""
    flags = torch.zeros(info.world_size, dtype=torch.float32, device=loss.device)
    flags[info.rank] = (~torch.isfinite(loss.detach())).float()
    all_sum(flags, info)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, info: DistInfo, dtype,
                    max_steps: Optional[int] = None, advance=None, callbacks: Sequence = (),
                    state: Optional[LoopState] = None, nan_policy: str = "stop") -> Dict[str, float]:
    """Train one epoch; return global ``train_loss``, ``train_acc``, ``samples``, ``train_seconds``,
    ``skipped_steps`` (batches dropped for a non-finite loss; not in the loss, accuracy or samples)."""
    model.train()
    state = state or LoopState()
    state.skipped_steps = 0
    # Sum of per-sample loss, correct predictions, samples: one tensor, reduced once at the end.
    totals = torch.zeros(3, dtype=torch.float64, device=info.device)
    local_loss, local_count = 0.0, 0
    # nan_policy=skip restores the buffers (BatchNorm running statistics) the dropped forward updated.
    buffers = list(model.buffers())
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        state.step, state.phase = step, "training step"
        inputs = inputs.to(info.device, dtype=dtype, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        saved = [b.clone() for b in buffers] if nan_policy == "skip" else None
        out = training_step(model, inputs, targets)
        loss = out["loss"]
        bad = nonfinite_ranks(loss, info)  # every rank gets the same answer: same path on all ranks
        if bad:
            ranks = f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
            if nan_policy != "skip":
                last = state.last_checkpoint or "none (no epoch finished yet)"
                raise NonFiniteLossError(
                    f"non-finite training loss at epoch {state.epoch}, step {step + 1} (on {ranks}); "
                    f"train.nan_policy=stop: stopped without saving epoch {state.epoch}, last good checkpoint: "
                    f"{last}; lower train.lr, check the data, or set train.nan_policy=skip")
            with torch.no_grad():
                for buffer, copy in zip(buffers, saved):
                    buffer.copy_(copy)
            state.skipped_steps += 1
            state.step, state.loss = step + 1, loss.detach()
            for callback in callbacks:
                if hasattr(callback, "on_step"):
                    callback.on_step(state)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch = targets.numel()
        totals += torch.stack([loss.detach().double() * batch, out["correct"].double(), out["count"].double()])
        state.step, state.loss = step + 1, loss.detach()
        for callback in callbacks:
            if hasattr(callback, "on_step"):
                callback.on_step(state)
        if advance is not None:
            local_loss += loss.item() * batch
            local_count += batch
            elapsed = time.perf_counter() - start
            advance(local_loss / local_count, local_count * info.world_size / max(elapsed, 1e-9))
    seconds = time.perf_counter() - start
    state.phase = "the epoch's training metrics"
    loss_sum, correct, count = all_sum(totals, info).tolist()
    if count == 0 and state.skipped_steps:
        raise NonFiniteLossError(f"every step of epoch {state.epoch} ({state.skipped_steps}) had a non-finite "
                                 f"loss and was skipped (train.nan_policy=skip); lower train.lr or check the data")
    if count == 0:
        raise DataError("an epoch had no training step; lower train.batch_size or set train.drop_last=false")
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "samples": int(count),
            "train_seconds": seconds, "skipped_steps": state.skipped_steps}


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, dtype) -> Dict[str, float]:
    """Accuracy and mean loss over the whole test set: each rank its shard, sums all-reduced."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=info.device)
    for inputs, targets in loader:
        inputs = inputs.to(info.device, dtype=dtype)
        targets = targets.to(info.device)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == targets).sum().double(),
                               torch.tensor(float(targets.numel()), dtype=torch.float64, device=info.device)])
    loss_sum, correct, count = all_sum(totals, info).tolist()
    model.train(was_training)
    return {"test_loss": loss_sum / max(count, 1), "test_acc": correct / max(count, 1),
            "test_correct": int(correct), "test_count": int(count)}


# --------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    metrics: List[Dict[str, Any]]
    model: nn.Module  # unwrapped (no DDP); SyncBatchNorm layers if norm=syncbn
    run_dir: str
    last_checkpoint: Optional[str]
    resumed_from: Optional[str] = None


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           nesterov=t.nesterov and t.momentum > 0)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    t = cfg.train
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    return None


def load_data(cfg: Config, info: DistInfo) -> Datasets:
    """Build the datasets on every rank; with ``data.download`` rank 0 downloads first.

    Failures are agreed on with one all_reduce, so a rank never waits for a rank that gave up.
    """
    d = cfg.data

    def build(download: bool) -> Datasets:
        return build_datasets(d.name, root=d.root, download=download, test_fraction=d.test_fraction,
                              synthetic_samples=d.synthetic_samples, synthetic_shape=d.synthetic_shape,
                              seed=cfg.train.seed)

    if not d.download or info.world_size == 1:
        return build(d.download)
    error = None
    if info.rank == 0:
        try:
            build(True)
        except DataError as caught:
            error = caught
    flag = all_sum(torch.tensor([1.0 if error else 0.0], device=info.device), info)
    if error:
        raise error
    if flag.item() > 0:
        raise DataError(f"data.name={d.name}: rank 0 could not download the dataset (see its message)")
    return build(False)


def _flatten(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def train(cfg: Config, resume: Optional[str] = None, reporter: Optional[Reporter] = None,
          callbacks: Sequence = ()) -> RunResult:
    """Run the whole training described by ``cfg``; see the module docstring. Returns on every rank."""
    global _failure_runs
    _failure_runs += 1
    run_start = time.perf_counter()
    info = setup_distributed(cfg)
    state = LoopState(run_dir=cfg.output_dir, phase="start-up")
    try:
        return _train(cfg, info, resume, reporter or Reporter(enabled=info.rank == 0), callbacks, run_start,
                      state)
    except TrainingError:
        raise
    except Exception as error:
        if info.world_size > 1 and is_collective_failure(error):
            timeout_s = group_timeout(cfg.dist.timeout_s)
            raise CollectiveError(describe_collective_failure(error, info, state, timeout_s)) from error
        raise
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, info: DistInfo, resume, reporter: Reporter, callbacks, run_start,
           state: LoopState) -> RunResult:
    t = cfg.train
    dtype = DTYPES[t.dtype]
    run_dir = cfg.output_dir
    seed_everything(t.seed)

    state.phase = "data loading"
    data = load_data(cfg, info)
    train_loader, sampler, test_loader = make_loaders(
        data, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, rank=info.rank,
        world_size=info.world_size, seed=t.seed, shuffle=t.shuffle, drop_last=t.drop_last,
        num_workers=cfg.data.num_workers,
    )
    model = build_model(cfg.model.name, norm=cfg.model.norm, init=cfg.model.init, act=cfg.model.act,
                        in_shape=data.shape, num_classes=data.num_classes)
    model.to(device=info.device, dtype=dtype)
    model_without_ddp = model
    optimizer = make_optimizer(cfg, model_without_ddp)
    scheduler = make_scheduler(cfg, optimizer)

    # Resume: every rank reads the same file (rank 0 wrote it) and restores the same state.
    metrics: List[Dict[str, Any]] = []
    start_epoch, resumed_from = 1, None
    found = ckpt.find_resume(resume, run_dir, reporter.warn) if resume else None
    if resume and found is None:
        reporter.warn(f"--resume auto: no checkpoint in {run_dir}; starting from epoch 1")
    if found is not None:
        resumed_from, saved = found
        ckpt.check_model_state(model_without_ddp, saved["model"], resumed_from)
        model_without_ddp.load_state_dict(saved["model"])
        try:
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None and saved["scheduler"]:
                scheduler.load_state_dict(saved["scheduler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise ckpt.CheckpointError(f"checkpoint {resumed_from}: optimizer/scheduler state does not fit "
                                       f"this config ({error})") from None
        ckpt.set_rng_state(saved["rng"])
        metrics = list(saved["metrics"])
        start_epoch = int(saved["epoch"]) + 1
        old, new = _flatten(saved["config"]), _flatten(to_dict(cfg))
        changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and k not in ("train.epochs", "output_dir")]
        if changed:
            reporter.warn(f"resuming with a config that differs from the checkpoint's: {', '.join(changed)}")

    state.phase = "model set-up (DDP)"
    if info.world_size > 1:
        ddp_kwargs = {"device_ids": [info.local_rank]} if info.device.type == "cuda" else {}
        # Synced BatchNorm leaves bit-identical running statistics on every rank, so DDP's broadcast of
        # rank 0's buffers before every forward would be one more collective per step for nothing.
        ddp_kwargs[_DDP_BUFFER_SYNC] = not has_sync_batchnorm(model_without_ddp)
        model = DistributedDataParallel(model_without_ddp, **ddp_kwargs)

    steps = len(train_loader) if t.max_steps is None else min(len(train_loader), t.max_steps)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if info.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        stale = ckpt.remove_stale_temp_files(run_dir)
        if stale:
            reporter.warn(f"removed {stale} temp file(s) of an interrupted write from {run_dir}")
        if found is None:
            removed = ckpt.remove_checkpoints(run_dir)
            if removed:
                reporter.warn(f"fresh run: removed {removed} old checkpoint(s) from {run_dir} "
                              f"(pass --resume auto to continue a run instead)")
        ckpt.atomic_write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), os.path.join(run_dir, "config.yaml"))
        ckpt.atomic_write_text("".join(json.dumps(m) + "\n" for m in metrics), metrics_path)

    norm_text = cfg.model.norm + (" (synced over all ranks)" if has_sync_batchnorm(model_without_ddp) and
                                  info.world_size > 1 else "")
    reporter.keys([("model", f"{cfg.model.name} ({count_parameters(model_without_ddp):,} params)"),
                   ("norm", norm_text), ("init", cfg.model.init)])
    reporter.keys([("data", f"{cfg.data.name} ({len(data.train):,} train / {len(data.test):,} test)"),
                   ("steps/epoch", steps), ("dtype", t.dtype)])
    reporter.keys([("global batch", f"{info.world_size * t.batch_size} = {info.world_size} rank(s) x "
                                    f"{t.batch_size}"),
                   ("backend", f"{info.backend} on {info.device.type}" if info.world_size > 1
                    else f"none (one process) on {info.device.type}"),
                   ("threads/rank", torch.get_num_threads())])
    reporter.keys([("run dir", run_dir)])
    if resumed_from:
        reporter.info(f"resumed from {resumed_from} (epoch {start_epoch - 1} done)")
        for row in metrics:
            reporter.epoch_row(row)

    state.metrics, state.run_dir = metrics, run_dir
    last_path = resumed_from
    state.last_checkpoint = last_path
    for epoch in range(start_epoch, t.epochs + 1):
        epoch_start = time.perf_counter()
        state.epoch = epoch
        sampler.set_epoch(epoch)
        with reporter.epoch_progress(epoch, t.epochs, steps) as advance:
            train_stats = train_one_epoch(model, train_loader, optimizer, info, dtype, t.max_steps,
                                          advance, callbacks, state, nan_policy=t.nan_policy)
        if train_stats["skipped_steps"]:
            reporter.warn(f"epoch {epoch}: skipped {train_stats['skipped_steps']} step(s) with a non-finite loss "
                          f"(train.nan_policy=skip)")
        if scheduler is not None:
            scheduler.step()
        state.phase = "evaluation"
        broadcast_buffers(model_without_ddp, info)
        test_stats = evaluate(model_without_ddp, test_loader, info, dtype)
        row = {
            "epoch": epoch,
            "train_loss": train_stats["train_loss"],
            "train_acc": train_stats["train_acc"],
            "test_loss": test_stats["test_loss"],
            "test_acc": test_stats["test_acc"],
            "samples_per_s": train_stats["samples"] / max(train_stats["train_seconds"], 1e-9),
            "seconds": time.perf_counter() - epoch_start,
            "lr": optimizer.param_groups[0]["lr"],
            "samples": train_stats["samples"],
            "skipped_steps": train_stats["skipped_steps"],
        }
        metrics.append(row)
        reporter.epoch_row(row)
        if info.rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            last_path = ckpt.save_checkpoint(run_dir, epoch, {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "rng": ckpt.rng_state(),
                "config": to_dict(cfg),
                "metrics": metrics,
            }, keep=t.keep_checkpoints)
        else:
            last_path = ckpt.checkpoint_path(run_dir, epoch)
        state.last_checkpoint = last_path
        state.phase = "end of epoch"
        for callback in callbacks:
            if hasattr(callback, "on_epoch_end"):
                callback.on_epoch_end(state)

    total = time.perf_counter() - run_start
    if metrics:
        best = max(metrics, key=lambda m: m["test_acc"])
        reporter.summary([
            ("test accuracy", f"final {metrics[-1]['test_acc']:.2%}, best {best['test_acc']:.2%} (epoch {best['epoch']})"),
            ("total time", f"{total:.1f} s for {len(metrics) - (start_epoch - 1)} epoch(s) on {info.world_size} "
                           f"rank(s)"),
            ("run dir", f"{run_dir}/  config.yaml  metrics.jsonl  ckpt_epoch{{N}}.pt (last {t.keep_checkpoints})"),
            ("evaluate", f"python launch/eval.py --checkpoint {last_path}"),
        ])
    return RunResult(metrics, model_without_ddp, run_dir, last_path, resumed_from)


# --------------------------------------------------------------------------- evaluation of a checkpoint


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
    data = build_datasets(cfg.data.name, root=cfg.data.root, download=cfg.data.download,
                          test_fraction=cfg.data.test_fraction, synthetic_samples=cfg.data.synthetic_samples,
                          synthetic_shape=cfg.data.synthetic_shape, seed=cfg.train.seed)
    model = build_model(cfg.model.name, norm=cfg.model.norm, init="default", act=cfg.model.act,
                        in_shape=data.shape, num_classes=data.num_classes)
    model = to_plain(model).to(dtype=dtype)  # SyncBatchNorm -> BatchNorm: a one-process model
    ckpt.check_model_state(model, state["model"], path)
    model.load_state_dict(state["model"])
    info = DistInfo(0, 1, 0, 1, "", torch.device("cpu"), False)
    _, _, test_loader = make_loaders(data, batch_size=1, eval_batch_size=cfg.train.eval_batch_size, rank=0,
                                     world_size=1, seed=0, drop_last=False)
    result = evaluate(model, test_loader, info, dtype)
    result.update(checkpoint=path, epoch=int(state["epoch"]), dataset=cfg.data.name,
                  model=cfg.model.name, norm=cfg.model.norm)
    if export:
        ckpt.atomic_save(model.state_dict(), export)
        result["export"] = export
    return result


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a small CNN with synced BatchNorm under DDP (run it with torchrun, or as one process).",
    )
    p.add_argument("--config", required=True, help="YAML config file, e.g. configs/lenet.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, typed like YAML (repeatable): --set train.epochs=3")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the newest good checkpoint of the run dir (auto) or from PATH")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    threads = cfg.dist.threads or default_threads(_env_int("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(threads)
    result = train(cfg, resume=args.resume)
    del result
    return 0
