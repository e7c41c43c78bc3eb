"""``update_bn_stats``: exact BatchNorm statistics over every rank's batches ("precise BN").

Each BatchNorm layer accumulates the count, mean and variance of everything that enters it (float64,
``stats.combine_stats``); one ``all_gather`` at the end carries every layer's statistics to every rank,
where the same combination in the same order gives the same bits. Collectives, the per-forward exchange
and the empty-batch stand-in: docs/precise_bn.md. The stand-in runs the whole model, unlike
``syncnorm.join``'s replay of layer calls: it must join collectives syncnorm does not issue (FSDP's), and
a rank here may have had no batch at all to record.
"""

import sys
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm import comm, stats
from syncnorm.join import _model_device
from syncnorm.module import SyncBatchNorm

__all__ = ["update_bn_stats"]

# Input dtypes the stand-in forward can rebuild from the per-forward exchange (their index travels).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8  # input dimensions the exchange carries


class _LayerStats:
    """Count, mean and biased variance (float64, per channel) of every value that entered one layer."""

    def __init__(self, layer: _BatchNorm) -> None:
        zeros = torch.zeros(layer.num_features, dtype=torch.float64, device=layer.running_mean.device)
        self.count, self.mean, self.var = 0, zeros, zeros.clone()

    def add(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """Forward pre-hook: fold this call's input into the totals (Chan's pairwise combination)."""
        input = args[0]
        if not isinstance(input, Tensor) or input.dim() < 2 or input.numel() == 0:
            return  # the layer's own forward reports a bad input; an empty one adds nothing
        # Per batch in the layer's own statistics dtype (as BatchNorm computes them); across batches and ranks float64.
        count, mean, var = stats.local_stats(input.detach())
        mean, var = mean.to(torch.float64), var.to(torch.float64)
        if self.count == 0:
            self.count, self.mean, self.var = count, mean, var
            return
        counts = torch.tensor([self.count, count], dtype=torch.float64, device=mean.device)
        self.mean, self.var = stats.combine_stats(counts, torch.stack([self.mean, mean]), torch.stack([self.var, var]))
        self.count += count


def _communicates_in_forward(model: nn.Module, comm_device: torch.device) -> bool:
    """Whether a training-mode forward of ``model`` runs collectives (synced layers, FSDP all-gathers), so that
    every rank must run the same number of forwards; the same answer on every rank (they vote where a synced
    layer's group leaves out some rank, whose forward then does not communicate while the members' does)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()
    synced = [module for module in model.modules() if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm))]
    mine = any(FSDPModule and isinstance(module, FSDPModule) for module in model.modules()) or any(
        comm.world_size(layer.process_group) > 1 for layer in synced)
    if all(comm.world_size(layer.process_group) == comm.world_size() for layer in synced):
        return mine  # every rank is in every group: every rank has this answer
    return bool(comm.all_gather(torch.tensor([float(mine)], device=comm_device)).any())


def _describe(input: Optional[Tensor], device: torch.device) -> Tensor:
    """``[has a batch, dtype index, ndim, shape...]`` for the per-forward exchange."""
    packet = torch.zeros(3 + _MAX_DIMS, dtype=torch.float64, device=device)
    if input is None:
        return packet
    if not isinstance(input, Tensor) or input.dtype not in _DTYPES or input.dim() > _MAX_DIMS:
        raise TypeError(
            f"update_bn_stats expected batches whose input is a tensor of at most {_MAX_DIMS} dimensions "
            f"(got {type(input).__name__}"
            f"{f' of shape {list(input.shape)}, {input.dtype}' if isinstance(input, Tensor) else ''}): "
            "a rank that runs out of batches copies the input's shape for its stand-in forward"
        )
    packet[:3] = torch.tensor([1.0, _DTYPES.index(input.dtype), input.dim()], dtype=torch.float64)
    packet[3 : 3 + input.dim()] = torch.tensor(list(input.shape), dtype=torch.float64)
    return packet


def _stand_in_input(gathered: Tensor, device: torch.device) -> Tensor:
    """An empty batch shaped like the input of the first rank that still has one: its forward joins
    every collective of the model and adds nothing to any statistic (count 0)."""
    row = next(row for row in gathered.tolist() if row[0])
    ndim = int(row[2])
    shape = [0] + [int(size) for size in row[4 : 3 + ndim]]
    return torch.empty(shape, dtype=_DTYPES[int(row[1])], device=device)


def _expected_batches(batches: Iterable, num_batches: Optional[int]) -> Optional[int]:
    """This rank's number of batches in the pass, where ``batches`` has a length or ``num_batches`` caps it."""
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, num_batches)


def _progress_printer(total: Optional[int]) -> Callable[[int, Optional[int]], None]:
    """``progress=True``: a line on stderr every tenth of the pass (every 100 batches when its length
    is unknown), on global rank 0 only."""
    rank = torch.distributed.get_rank() if comm.is_distributed() else 0
    step = max(1, total // 10) if total else 100

    def report(done: int, total: Optional[int]) -> None:
        if rank == 0 and (done % step == 0 or done == total):
            of = f"/{total}" if total else ""
            print(f"update_bn_stats: {done}{of} batches", file=sys.stderr, flush=True)

    return report


def update_bn_stats(
    model: nn.Module,
    batches: Iterable,
    num_batches: Optional[int] = None,
    process_group: comm.ProcessGroup = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: Union[bool, Callable[[int, Optional[int]], None], None] = None,
) -> None:
    """Recompute every BatchNorm layer's running statistics exactly, over all ranks' batches.

    One pass of ``model`` in training mode (without gradients) over this rank's ``batches``; afterwards
    each BatchNorm layer with running statistics (``BatchNorm1d/2d/3d``, :class:`syncnorm.SyncBatchNorm`,
    ``torch.nn.SyncBatchNorm``) holds in ``running_mean`` and ``running_var`` the mean and the unbiased
    variance, per channel, of *every value that entered it during the pass on every rank of*
    ``process_group``, pooled exactly (float64, count-weighted), the same bits on every rank. During the
    pass each layer normalizes as in training (a synced layer with the global batch). Nothing else
    changes: parameters, ``train``/``eval`` mode, ``momentum``, ``eps`` and ``num_batches_tracked`` (the
    pass is not a training step); a layer that saw no value on any rank keeps its statistics.

    Ranks may have different numbers and sizes of batches: when the model communicates in its forward
    (synced layers, FSDP), a rank that has run out runs it on an empty batch of the same shape until
    every rank is done (a model that refuses a batch of 0 samples raises ``ValueError`` on every rank;
    docs/precise_bn.md). All ranks must call this, with the same model.

    Args:
        model: the model, plain or wrapped in ``DistributedDataParallel`` (its ``module`` runs, without
            DDP's per-forward buffer broadcast) or sharded with ``fully_shard``.
        batches: iterable of inputs, or of ``(input, ...)`` tuples/lists whose first element is the
            input (a ``DataLoader`` of ``(images, labels)``), as ``torch.optim.swa_utils.update_bn``.
        num_batches: use at most this many batches of ``batches`` on this rank; None: all of them.
        process_group: ranks whose values are pooled (a group or a 1-D ``DeviceMesh``/mesh dimension);
            None: all ranks. With data replicated over a second mesh dimension, pass the data-parallel one
            (``mesh["dp"]``), so each value counts once. A rank outside the group runs its pass (its forwards
            may communicate with the others) and keeps its model, as torch's collectives on a non-member.
        device: move each input there first; None: leave it where the batch put it.
        progress: ``True`` prints a line per tenth of the pass on rank 0 (stderr); a callable is called
            as ``progress(batches_done, total)`` after each of this rank's batches, ``total`` being its
            number of batches where known (``num_batches``, ``len(batches)``), else None.

    Example::

        >>> loader = DataLoader(train_set, batch_size=64, sampler=DistributedSampler(train_set))
        >>> syncnorm.update_bn_stats(ddp_model, loader, num_batches=200)   # all ranks
        >>> evaluate(ddp_model.module.eval())
    """
    group = comm.resolve_group(process_group)
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"update_bn_stats expected num_batches >= 0 or None (got {num_batches})")
    # Not DDP's forward: it broadcasts buffers, a collective per forward that a rank without a batch cannot join.
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    layers = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    comm_device = torch.device(device) if device is not None else _model_device(net)
    total = _expected_batches(batches, num_batches)
    if progress is True:
        progress = _progress_printer(total)
    modes = [(module, module.training) for module in net.modules()]
    saved = [(layer, [buffer.clone() for buffer in layer.buffers(recurse=False)]) for layer in layers]
    totals = [_LayerStats(layer) for layer in layers]
    hooks = [layer.register_forward_pre_hook(total.add) for layer, total in zip(layers, totals)]
    try:
        net.train()
        with torch.no_grad():
            _run_pass(net, batches, num_batches, device, comm_device, progress, total)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for layer, buffers in saved:
                for buffer, value in zip(layer.buffers(recurse=False), buffers):
                    buffer.copy_(value)
    if comm.in_group(group):  # as torch's collectives, a no-op for a rank outside the group
        _pool_and_store(layers, totals, group, comm_device)


def _run_pass(net: nn.Module, batches: Iterable, num_batches: Optional[int], device, comm_device: torch.device,
              progress, total: Optional[int]) -> None:
    """This rank's forwards; with collectives in the forward, stand-in forwards until all ranks are done."""
    lockstep = comm.world_size() > 1 and _communicates_in_forward(net, comm_device)
    iterator = iter(batches)
    done = 0
    probed = False
    while True:
        input = None
        if num_batches is None or done < num_batches:
            batch = next(iterator, None)
            if batch is not None:
                input = batch[0] if isinstance(batch, (list, tuple)) else batch  # (input, ...) or input
                if device is not None:
                    input = input.to(device)
        if lockstep:
            # Who still has a batch, and the shape a rank that ran out copies: one small all_gather.
            try:
                packet, problem = _describe(input, comm_device), None
            except TypeError as error:
                # Sent as a marker first, so that every rank raises instead of waiting for this one.
                packet, problem = torch.full((3 + _MAX_DIMS,), -1.0, dtype=torch.float64, device=comm_device), error
            gathered = comm.all_gather(packet)
            if problem is not None:
                raise problem
            if (gathered[:, 0] < 0).any():
                bad = [str(rank) for rank, flag in enumerate(gathered[:, 0].tolist()) if flag < 0]
                raise TypeError(f"update_bn_stats got an input it cannot stand in for on rank(s) {', '.join(bad)} "
                                "(see the error on that rank); all ranks stop here instead of waiting for it")
            if not gathered[:, 0].any():
                return
            if not probed and not gathered[:, 0].all():
                # The first stand-in: every rank runs the empty batch once, so a model that refuses it fails on
                # every rank, not on the stand-in rank alone while the others wait in a collective.
                probed = True
                _probe_empty_batch(net, _stand_in_input(gathered, comm_device))
            if input is None:
                net(_stand_in_input(gathered, comm_device))
                continue
        elif input is None:
            return
        net(input)
        done += 1
        if progress:
            progress(done, total)


def _probe_empty_batch(net: nn.Module, empty: Tensor) -> None:
    """One forward of an empty batch on every rank; a model that refuses it raises the same error everywhere."""
    try:
        net(empty)
    except Exception as error:
        raise ValueError(
            f"update_bn_stats expected a model that accepts a batch of 0 samples (got {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''} for input shape {list(empty.shape)}): a rank that "
            "has run out of batches runs one to join the other ranks' collectives; give every rank the same "
            "number of batches (e.g. num_batches=), or make the forward accept an empty batch "
            "(torch.flatten(x, 1) instead of x.view(x.size(0), -1))"
        ) from error


def _pool_and_store(layers: List[_BatchNorm], totals: List[_LayerStats], group, device: torch.device) -> None:
    """One gather of every layer's local statistics; the same combination on every rank; the buffers."""
    # The synced layers' packet layout with an empty tail: [count, mean..., var...] per layer.
    packets = [stats.pack_synced(float(t.count), t.mean, t.var, t.mean[:0]).to(device) for t in totals]
    packet = torch.cat(packets) if packets else torch.zeros(0, dtype=torch.float64, device=device)
    lengths = comm.all_gather(torch.tensor([packet.numel()], device=device), group).flatten().tolist()
    if len(set(lengths)) > 1:
        seen = ", ".join(f"rank {rank}: {n}" for rank, n in zip(comm.group_ranks(group), lengths))
        raise ValueError(f"update_bn_stats expected the same BatchNorm layers on every rank (statistics "
                         f"of {seen} values); every rank must pass the same model")
    if not totals:
        return
    gathered = comm.all_gather(packet, group).split([1 + 2 * layer.num_features for layer in layers], dim=1)
    with torch.no_grad():
        for layer, part in zip(layers, gathered):
            counts, means, vars = stats.unpack_synced(part, layer.num_features)
            total = counts.sum()
            if total == 0:
                continue  # the layer saw nothing: keep what it had
            mean, var = stats.combine_stats(counts, means, vars)
            # n / (n - 1): the unbiased variance, as BatchNorm keeps (n >= 2: BatchNorm refuses 1 value).
            unbiased = var * (total / (total - 1).clamp_min(1))
            layer.running_mean.copy_(mean.to(layer.running_mean.device, layer.running_mean.dtype))
            layer.running_var.copy_(unbiased.to(layer.running_var.device, layer.running_var.dtype))
