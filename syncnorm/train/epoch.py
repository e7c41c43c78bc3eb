"""One training step, one epoch, evaluation: what :func:`syncnorm.train.loop.train` runs per epoch.

Per epoch: :func:`train_one_epoch` (one :func:`training_step` per batch, then the step callbacks),
then :func:`evaluate` over the whole test set (each rank its shard, counts summed with one all_reduce).

Between the forward of :func:`training_step` and ``backward``/``optimizer.step``,
:func:`nonfinite_ranks` agrees on a non-finite loss across ranks (one all_reduce of ``world_size``
floats per step) and ``train.nan_policy`` decides: ``stop`` raises :class:`NonFiniteLossError`
(epoch, step, ranks), ``skip`` drops the batch on every rank (no backward, no step, BatchNorm buffers
restored) and counts it in the epoch's ``skipped_steps``.

``callbacks``: objects with optional ``on_step(state)`` and ``on_epoch_end(state)`` methods, where
``state`` is the :class:`LoopState` (epoch, step, loss, metrics so far).
"""

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import syncnorm
from syncnorm import comm
from syncnorm.train.distributed import DistInfo, all_sum
from syncnorm.train.errors import DataError, NonFiniteLossError


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
    # Through syncnorm.comm, so that inside syncnorm.join (data.shard=uneven) a rank that ran out stands
    # in for it (with zeros: no bad loss) like for the synced layers' sums.
    flags = comm.sum_across_ranks(flags)  # the flags as they are in one process
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def notify(callbacks: Sequence, hook: str, state: LoopState) -> None:
    for callback in callbacks:
        if hasattr(callback, hook):
            getattr(callback, hook)(state)


def _nonfinite_loss(bad: List[int], step: int, state: LoopState, nan_policy: str) -> None:
    """``train.nan_policy=stop``: raise, naming the step and the ranks; ``skip``: return (the caller drops it)."""
    if nan_policy == "skip":
        return
    ranks = f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
    last = state.last_checkpoint or "none (no epoch finished yet)"
    raise NonFiniteLossError(
        f"non-finite training loss at epoch {state.epoch}, step {step + 1} (on {ranks}); "
        f"train.nan_policy=stop: stopped without saving epoch {state.epoch}, last good checkpoint: "
        f"{last}; lower train.lr, check the data, or set train.nan_policy=skip")


@dataclass(frozen=True)
class StepSettings:
    """How each optimizer step runs: ``train.amp`` (``autocast()`` is the forward's context, ``scaler``
    the fp16 GradScaler or None), ``train.channels_last``, ``train.grad_accum``, ``train.clip_grad``."""

    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    scaler: Optional[Any] = None
    channels_last: bool = False
    grad_accum: int = 1
    clip_grad: Optional[float] = None


def optimizer_steps(batches: int, grad_accum: int = 1, max_steps: Optional[int] = None) -> int:
    """Optimizer steps of an epoch of ``batches`` batches: groups of ``grad_accum`` (the last may be
    shorter), at most ``max_steps``."""
    steps = -(-batches // grad_accum)
    return steps if max_steps is None else min(steps, max_steps)


def _accumulating(model: nn.Module, accumulate: bool):
    """DDP's ``no_sync`` for a micro-batch whose gradients stay local (the group's last one all-reduces
    them all), else nothing; a model without DDP has nothing to skip."""
    if accumulate and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


class _Timed:
    """Iterates ``batches`` and adds the time spent waiting for each to ``seconds``."""

    def __init__(self, batches: Iterable) -> None:
        self.batches, self.seconds = batches, 0.0

    def __iter__(self):
        iterator = iter(self.batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - started
                return
            self.seconds += time.perf_counter() - started
            yield batch


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, info: DistInfo, dtype,
                    max_steps: Optional[int] = None, advance=None, callbacks: Sequence = (),
                    state: Optional[LoopState] = None, nan_policy: str = "stop",
                    step_samples: Optional[Callable[[int], int]] = None,
                    settings: StepSettings = StepSettings()) -> Dict[str, float]:
    """Train one epoch; return global ``train_loss``, ``train_acc``, ``samples``, ``train_seconds``,
    ``data_wait`` (share of the training time spent waiting for batches, over all ranks),
    ``skipped_steps`` (steps dropped for a non-finite loss; not in the loss, accuracy or samples).

    A step is ``settings.grad_accum`` micro-batches (the epoch's last step may have fewer): each one's
    loss is divided by the step's number of micro-batches and backpropagated under DDP's ``no_sync``
    but the last, whose backward all-reduces the summed gradients; then clipping and the optimizer
    step. Synced layers sync each micro-batch's statistics. ``max_steps`` counts steps. Under
    ``train.nan_policy=skip`` a non-finite loss drops its whole step on every rank.

    ``step_samples`` (``data.shard=uneven``): the number of samples of step ``k`` over all ranks. The
    steps then run under ``syncnorm.join`` (ranks may have different numbers of batches), and each
    rank's loss is weighted by ``batch * world_size / step_samples(k)``, so that DDP's average of the
    gradients is that of the mean loss over the step's samples: one process with the global batch.
    """
    model.train()
    state = state or LoopState()
    state.skipped_steps = 0
    accum = settings.grad_accum
    if step_samples is not None and accum > 1:
        raise ValueError("expected grad_accum=1 with step_samples (data.shard=uneven)")
    # Sum of per-sample loss, correct predictions, samples: one tensor, reduced once at the end.
    totals = torch.zeros(3, dtype=torch.float64, device=info.device)
    local_loss, local_count = 0.0, 0
    # nan_policy=skip restores the buffers (BatchNorm running statistics) the dropped forward updated.
    buffers = list(model.buffers())
    n_batches = len(loader) if max_steps is None else min(len(loader), max_steps * accum)
    start = time.perf_counter()
    batches = _Timed(itertools.islice(loader, n_batches))
    timed = batches
    if step_samples is not None:
        batches = _under_join(model, batches)
    step, dropped = 0, False
    for index, (inputs, targets) in enumerate(batches):
        micro = index % accum
        group_size = min(accum, n_batches - (index - micro))
        last = micro == group_size - 1
        if micro == 0:
            state.step, state.phase = step, "training step"
            saved = [b.clone() for b in buffers] if nan_policy == "skip" else None
            step_totals, dropped = torch.zeros_like(totals), False
        if not dropped:
            with _accumulating(model, not last):
                dropped = _micro_batch(model, inputs, targets, optimizer, info, dtype, settings, micro == 0,
                                       1.0 if step_samples is None else
                                       targets.numel() * info.world_size / step_samples(step),
                                       group_size, step_totals, state, nan_policy)
            if dropped:
                with torch.no_grad():
                    for buffer, copy in zip(buffers, saved):
                        buffer.copy_(copy)
                optimizer.zero_grad(set_to_none=True)  # the step's earlier micro-batches go too
                state.skipped_steps += 1
        if not last:
            continue
        if not dropped:
            _optimizer_step(model, optimizer, settings)
            totals += step_totals
        step += 1
        state.step = step
        notify(callbacks, "on_step", state)
        if advance is not None and not dropped:
            local_loss += step_totals[0].item()
            local_count += int(step_totals[2].item())
            elapsed = time.perf_counter() - start
            advance(local_loss / local_count, local_count * info.world_size / max(elapsed, 1e-9),
                    timed.seconds / max(elapsed, 1e-9))
    seconds = time.perf_counter() - start
    if step_samples is not None:
        broadcast_optimizer_state(optimizer, info)
    state.phase = "the epoch's training metrics"
    # The times ride along with the sums (one all_reduce): the data-wait share over all ranks' time.
    summed = all_sum(torch.cat([totals, torch.tensor([timed.seconds, seconds], dtype=torch.float64,
                                                     device=info.device)]), info).tolist()
    loss_sum, correct, count, wait_s, train_s = summed
    if count == 0 and state.skipped_steps:
        raise NonFiniteLossError(f"every step of epoch {state.epoch} ({state.skipped_steps}) had a non-finite "
                                 f"loss and was skipped (train.nan_policy=skip); lower train.lr or check the data")
    if count == 0:
        raise DataError("an epoch had no training step; lower train.batch_size or set train.drop_last=false")
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "samples": int(count),
            "train_seconds": seconds, "data_wait": wait_s / max(train_s, 1e-9),
            "skipped_steps": state.skipped_steps}


def _micro_batch(model, inputs, targets, optimizer, info: DistInfo, dtype, settings: StepSettings, first: bool,
                 weight: float, group_size: int, step_totals: torch.Tensor, state: LoopState,
                 nan_policy: str) -> bool:
    """Forward and backward of one micro-batch, its sums added to ``step_totals``; True when its loss
    was non-finite on some rank and ``nan_policy=skip`` drops the step (no backward)."""
    inputs = inputs.to(info.device, dtype=dtype, non_blocking=True)
    if settings.channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    targets = targets.to(info.device, non_blocking=True)
    with settings.autocast():
        out = training_step(model, inputs, targets)
    loss = out["loss"]
    state.loss = loss.detach()
    bad = nonfinite_ranks(loss, info)  # every rank gets the same answer: same path on all ranks
    if bad:
        _nonfinite_loss(bad, state.step, state, nan_policy)
        return True
    if first:
        optimizer.zero_grad(set_to_none=True)
    scaled = loss if weight == 1.0 else loss * weight
    if group_size > 1:
        scaled = scaled / group_size
    (settings.scaler.scale(scaled) if settings.scaler is not None else scaled).backward()
    batch = targets.numel()
    step_totals += torch.stack([loss.detach().double() * batch, out["correct"].double(), out["count"].double()])
    return False


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
    """Clip (``train.clip_grad``, after DDP's all-reduce: every rank clips alike) and step; with the fp16
    scaler, unscale first and let it skip a step whose gradients overflowed."""
    scaler = settings.scaler
    if settings.clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _under_join(model: nn.Module, batches: Iterable):
    """The batches, inside ``syncnorm.join(model)``: once they run out, this rank stands in for the
    steps the other ranks still run before the loop sees the end (the max_steps cap is applied before,
    so the loop never leaves early)."""
    with syncnorm.join(model):
        yield from batches


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, info: DistInfo) -> None:
    """Give every rank rank 0's optimizer state (momentum) after an uneven epoch: a rank that ran out
    skipped the last steps' updates of it (DDP's join re-syncs only the model). Under
    ``data.shard=uneven`` rank 0 holds the most samples, so it ran every step."""
    if info.world_size == 1:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value):
                        dist.broadcast(value, src=0)


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
