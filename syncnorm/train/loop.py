"""The training loop: process group, model, data, SGD, metrics, checkpoints, resume.

``main(argv)`` is what ``launch/train.py`` runs (under torchrun or as one plain process);
``train(cfg)`` is the loop itself and also runs inside an already initialized process group (tests).

Per epoch: ``sampler.set_epoch``, :func:`train_one_epoch` (one :func:`training_step` per batch, then
the step callbacks), :func:`evaluate` over the whole test set (each rank its shard, counts summed with
one all_reduce), one row on screen, one line in ``metrics.jsonl``, one checkpoint (rank 0).

Hook points for later features, without restructuring:

* ``training_step`` returns the loss before ``backward``/``optimizer.step`` run in
  :func:`train_one_epoch`; a ``train.nan_policy`` check belongs between the two (all ranks must agree,
  e.g. by summing a non-finite flag, before skipping a step).
* ``callbacks``: objects with optional ``on_step(state)`` and ``on_epoch_end(state)`` methods, where
  ``state`` is the :class:`LoopState` (epoch, step, loss, metrics so far). Raising from a callback stops
  the run after the last checkpoint written, as a kill would (the tests use this to interrupt runs).
"""

import argparse
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

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
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist.timeout_s))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, str(backend), device, owns)


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


# --------------------------------------------------------------------------- one epoch


@dataclass
class LoopState:
    """What callbacks see."""

    epoch: int = 0
    step: int = 0
    loss: Optional[torch.Tensor] = None
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    run_dir: str = ""


def training_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Forward one batch; return the mean loss (not yet backpropagated) and the batch's counts."""
    logits = model(inputs)
    loss = nn.functional.cross_entropy(logits, targets)
    with torch.no_grad():
        correct = (logits.argmax(1) == targets).sum()
    return {"loss": loss, "correct": correct, "count": torch.tensor(targets.numel(), device=targets.device)}


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, info: DistInfo, dtype,
                    max_steps: Optional[int] = None, advance=None, callbacks: Sequence = (),
                    state: Optional[LoopState] = None) -> Dict[str, float]:
    """Train one epoch; return global ``train_loss``, ``train_acc``, ``samples``, ``train_seconds``."""
    model.train()
    state = state or LoopState()
    # Sum of per-sample loss, correct predictions, samples: one tensor, reduced once at the end.
    totals = torch.zeros(3, dtype=torch.float64, device=info.device)
    local_loss, local_count = 0.0, 0
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        inputs = inputs.to(info.device, dtype=dtype, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        out = training_step(model, inputs, targets)
        loss = out["loss"]
        # (hook point: a train.nan_policy check on `loss` goes here, before backward/step)
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
    loss_sum, correct, count = all_sum(totals, info).tolist()
    if count == 0:
        raise DataError("an epoch had no training step; lower train.batch_size or set train.drop_last=false")
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "samples": int(count),
            "train_seconds": seconds}


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
    run_start = time.perf_counter()
    info = setup_distributed(cfg)
    try:
        return _train(cfg, info, resume, reporter or Reporter(enabled=info.rank == 0), callbacks, run_start)
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, info: DistInfo, resume, reporter: Reporter, callbacks, run_start) -> RunResult:
    t = cfg.train
    dtype = DTYPES[t.dtype]
    run_dir = cfg.output_dir
    seed_everything(t.seed)

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
        resumed_from, state = found
        ckpt.check_model_state(model_without_ddp, state["model"], resumed_from)
        model_without_ddp.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"]:
                scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise ckpt.CheckpointError(f"checkpoint {resumed_from}: optimizer/scheduler state does not fit "
                                       f"this config ({error})") from None
        ckpt.set_rng_state(state["rng"])
        metrics = list(state["metrics"])
        start_epoch = int(state["epoch"]) + 1
        old, new = _flatten(state["config"]), _flatten(to_dict(cfg))
        changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and k not in ("train.epochs", "output_dir")]
        if changed:
            reporter.warn(f"resuming with a config that differs from the checkpoint's: {', '.join(changed)}")

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

    state = LoopState(metrics=metrics, run_dir=run_dir)
    last_path = resumed_from
    for epoch in range(start_epoch, t.epochs + 1):
        epoch_start = time.perf_counter()
        state.epoch = epoch
        sampler.set_epoch(epoch)
        with reporter.epoch_progress(epoch, t.epochs, steps) as advance:
            train_stats = train_one_epoch(model, train_loader, optimizer, info, dtype, t.max_steps,
                                          advance, callbacks, state)
        if scheduler is not None:
            scheduler.step()
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
