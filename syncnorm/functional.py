"""The synchronized batch-norm autograd Function and its functional form.

The Function owns the math (``stats.py``) and the collectives (``comm.py``) of one synced training
step; deciding *whether* to sync (eval mode, one rank, no process group) is the caller's business,
and ``sync_batch_norm`` makes that decision for functional users.
"""

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from syncnorm import comm, stats
from syncnorm._compat import check_compile_supported, is_compiling
from syncnorm._identity import (FUNCTIONAL, TAIL, LayerIdentity, device_check_forward, device_check_sum,
                                gather_mismatch, sum_mismatch)
from syncnorm._recompute import is_recompute


def host_reads_allowed(input: Tensor) -> bool:
    """Whether the forward may read the gathered counts back to Python: for CPU tensors in eager mode (free,
    and errors raise at once). A CUDA tensor would synchronize with the device per layer (and forbid CUDA
    graphs), and a read under torch.compile is a graph break: those take the on-device path."""
    return _HOST_READS and input.device.type == "cpu" and not is_compiling()


# Tests switch this off to run the on-device path eagerly on CPU.
_HOST_READS = True


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm whose statistics span every rank of ``process_group``. All ranks must call it.

    Forward: local ``(count, mean, var)`` -> one all_gather -> exact global mean/variance -> normalize.
    Backward: local ``(sum_dy, invstd * sum_dy_xmu)`` -> one all-rank sum -> input gradient.

    For CUDA tensors and under ``torch.compile`` no value is read back to the host: counts, the global
    count and the empty-batch case stay on the device, and the cross-rank checks are on-device asserts.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], eps: float, momentum: stats.Scalar, process_group: comm.ProcessGroup,
                identity: Optional[LayerIdentity] = None, recompute: Union[bool, Tensor] = False) -> Tensor:
        identity = FUNCTIONAL if identity is None else identity
        global_mean, global_var, tail = synced_forward_stats(
            ctx, input, running_mean, running_var, eps, momentum, process_group, identity, recompute)
        if global_mean is None:
            # Every rank's batch is empty: nothing to normalize, and the running statistics stay as
            # they are (as in BatchNorm). Every rank knows this, so backward sends no sums.
            ctx.save_for_backward(input, weight, None, None, tail)
            return torch.empty_like(input)
        # Saving the variance, not invstd: the native kernels in backward take (var, eps) directly.
        ctx.save_for_backward(input, weight, global_mean, global_var, tail)
        return stats.normalize(input, global_mean, global_var, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        need_input_grad, need_weight_grad, need_bias_grad = ctx.needs_input_grad[:3]
        input, weight, mean, var, tail = ctx.saved_tensors
        nothing = (None,) * 7
        if isinstance(ctx.total, int) and ctx.total == 0:  # known on the host: no sums to send
            zeros = None if weight is None else torch.zeros_like(weight)
            return (
                torch.zeros_like(input) if need_input_grad else None,
                zeros if need_weight_grad else None,
                zeros.clone() if need_bias_grad and zeros is not None else None,
            ) + nothing

        # One native pass gives sum(dy) and the local weight gradient invstd * sum(dy * (x - mean)).
        sum_dy, grad_weight_local = stats.grad_sums_scaled(grad_output, input, mean, var, ctx.eps)

        grad_input = grad_weight = grad_bias = None
        if need_input_grad:
            # Every rank knows whether its input needs a gradient (the model is the same on all of
            # them), so the collective is skipped consistently, e.g. for a first layer fed data.
            finish_sums = start_global_grad_sums(
                sum_dy, grad_weight_local, ctx.identity, ctx.process_group, ctx.route, tail
            )
            # Everything that needs no other rank's data runs while the sums are in flight.
            scales = stats.input_grad_scales(input, var, ctx.eps, weight, ctx.total)
            grad_input = stats.input_grad_from_sums(
                grad_output, input, mean, var, ctx.eps, scales, finish_sums()
            )
        # Weight and bias gradients stay local on purpose: DistributedDataParallel averages parameter
        # gradients across ranks, so reducing them here as well would count them twice.
        if need_weight_grad:
            grad_weight = stats.as_dtype(grad_weight_local, weight.dtype)
        if need_bias_grad:
            grad_bias = stats.as_dtype(sum_dy, weight.dtype if weight is not None else grad_output.dtype)
        return (grad_input, grad_weight, grad_bias) + nothing


# A packet's head: count (or marker), channel count, and the identity tail (_identity.py).
HEAD = 2 + TAIL


def synced_forward_stats(ctx, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         eps: float, momentum: stats.Scalar, process_group: comm.ProcessGroup,
                         identity: LayerIdentity, recompute: Union[bool, Tensor]
                         ) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """A synced Function's forward up to the normalization: this rank's statistics, one all_gather checked on
    every rank, the running-stat update, and on ``ctx`` what backward needs (``process_group``, ``eps``,
    ``identity``, ``route``, ``total``: a Python int on the host path). All ranks of the group must call it.

    Returns the global mean and biased variance (None when every rank's batch is empty: backward then sends
    no sums) and the backward's identity tail, to save (a constant made in a compiled backward can come from
    another layer's trace). Raises ``ValueError`` on every rank (on-device asserts off the host path) when a
    rank flagged an invalid input, reached another synced layer or built another width, or when the global
    batch has one value per channel. ``recompute`` (a 0-dim bool tensor in compiled code): a checkpoint's
    recomputed forward, sent as the phase so that it meets the other ranks' recompute; it leaves the running
    statistics alone, so the step counts once.
    """
    count, mean, var = stats.local_stats(input)
    ctx.process_group, ctx.eps, ctx.identity, ctx.route = process_group, eps, identity, comm.current_route()
    channels = mean.numel()
    tail = _forward_tail(identity, mean, channels, _packet_width(channels, identity, mean, process_group), recompute)
    # Gather (count, mean, var) rather than all-reducing sums: counts may differ between ranks, and
    # per-rank means and variances combine without the cancellation of E[x^2] - E[x]^2.
    gathered = comm.all_gather(stats.pack_synced(count, mean, var, tail), process_group)
    if not host_reads_allowed(input):
        counts, means, vars = stats.unpack_synced(gathered, channels)
        ctx.total = counts.sum()
        _assert_counts_on_device(counts, ctx.total)
        device_check_forward(gathered[:, 1:HEAD], tail[: HEAD - 1])
        global_mean, global_var = stats.combine_stats(counts, means, vars)
    else:  # the counts and identities as Python numbers (one small copy): the checks cost no ops
        counts = _check_heads(gathered[:, :HEAD].tolist(), identity, process_group, 2 if recompute is True else 0)
        ctx.total = int(sum(counts))
        if ctx.total == 1:
            raise ValueError(_one_value_message(f"got input size {list(input.shape)} on this rank, "))
        if ctx.total == 0:
            return None, None, identity.tail(mean, 1)
        global_mean, global_var = stats.combine_gathered(gathered, counts, channels)
    if recompute is not True:
        if isinstance(recompute, Tensor):
            momentum = (~recompute).to(global_mean.dtype) * momentum
        stats.update_running_stats(running_mean, running_var, global_mean, global_var, ctx.total, momentum)
    return global_mean, global_var, identity.tail(mean, 1)


def _forward_tail(identity: LayerIdentity, like: Tensor, channels: int, width: int, recompute) -> Tensor:
    pad = width - HEAD - 2 * channels
    if isinstance(recompute, Tensor):  # known when the compiled graph runs: chosen on the device
        return torch.where(recompute, identity.tail(like, 2, channels, pad), identity.tail(like, 0, channels, pad))
    return identity.tail(like, 2 if recompute else 0, channels, pad)


def _packet_width(channels: int, identity: LayerIdentity, like: Tensor, process_group: comm.ProcessGroup) -> int:
    """Floats per packet on ``process_group`` (comm: every packet of a group has one width). A layer wider
    than any before asks the group first, in a packet of the old width: every rank agrees, or raises
    naming the layers (a rank at another layer) or the channel counts (another model) — with no host
    read after the first step. A compiled graph cannot ask: it pads to the width its layer saw last in
    eager mode, or not at all (then a rank at a layer of another width is gloo's abort, as for torch)."""
    needed = HEAD + 2 * channels
    if is_compiling():
        width = identity.width
        return width if width is not None and width >= needed else needed
    width = comm.packet_width(process_group, HEAD)
    if needed > width:
        empty = like[:0]
        request = stats.pack_synced(stats.WIDTH_REQUEST, empty, empty, identity.tail(like, 0, channels, width - HEAD))
        _check_heads(comm.all_gather(request, process_group).tolist(), identity, process_group)
        comm.set_packet_width(process_group, needed)  # the same on every rank: the channel counts agree
        width = needed
    identity.width = width
    return width


def _check_heads(heads: List[List[float]], identity: LayerIdentity, process_group: comm.ProcessGroup,
                 phase: int = 0) -> List[float]:
    """Raise when a gathered head shows an invalid input, another layer or another channel count;
    return the counts."""
    counts = [head[0] for head in heads]
    if stats.INVALID_COUNT in counts:
        ranks = comm.group_ranks(process_group)
        names = ", ".join(str(rank) for rank, count in zip(ranks, counts) if count == stats.INVALID_COUNT)
        raise ValueError(f"SyncBatchNorm got an invalid input on rank(s) {names} {_STOP_HERE}")
    problem = gather_mismatch([head[2:HEAD] for head in heads], identity, lambda: comm.group_ranks(process_group),
                              phase)
    if problem is not None:
        raise ValueError(problem)
    if len({head[1] for head in heads}) > 1:
        seen = ", ".join(f"rank {rank}: {int(head[1])}" for rank, head in zip(comm.group_ranks(process_group), heads))
        raise ValueError(f"SyncBatchNorm expected the same num_features on every rank (got {seen}); "
                         "every rank must build the same model")
    return counts


def start_global_grad_sums(
    sum_dy: Tensor, sum_dy_xmu: Tensor, identity: LayerIdentity, process_group: comm.ProcessGroup,
    route: Optional[comm.Route] = None, tail: Optional[Tensor] = None,
) -> Callable[[], Tensor]:
    """Start the all-rank sum of the per-channel ``sum_dy`` and ``sum_dy_xmu`` (any per-channel pair of
    the same length and dtype) and return a function that waits for it and returns ``[sum_dy...,
    sum_dy_xmu...]`` summed over ranks, after checking on every rank that all of them sent ``identity``'s
    backward. Exactly one collective, as wide as the forward's gather; all ranks must call it.
    ``route``: the forward's ``comm.current_route()``; ``tail``: ``identity.tail(like, 1)`` saved in
    the forward (needed in a compiled backward)."""
    channels = sum_dy.numel()
    needed = HEAD + 2 * channels
    width = max(needed, identity.width or 0) if is_compiling() else comm.packet_width(process_group, needed)
    if tail is None or not is_compiling():
        head = identity.tail(sum_dy, 1, pad=width - needed)
    else:
        head = torch.cat([tail, tail.new_zeros(width - needed)])
    finish = comm.start_sum_across_ranks(torch.cat([head, sum_dy, sum_dy_xmu]), process_group, route)

    def finish_and_check() -> Tensor:
        summed = finish()
        tail, world = summed[2:HEAD], comm.world_size(process_group)  # the first two slots are unused
        if not host_reads_allowed(summed):
            device_check_sum(tail, world)  # the on-device path asserts; the host path raises on every rank
        else:
            problem = sum_mismatch(tail.tolist(), identity, world)
            if problem is not None:
                raise ValueError(problem)
        return summed[-2 * channels :]

    return finish_and_check


def _one_value_message(detail: str = "") -> str:
    return (f"Expected more than 1 value per channel when training across all ranks ({detail}1 value per "
            "channel in total)")


def _assert_counts_on_device(counts: Tensor, total: Tensor) -> None:
    """The per-step cross-rank checks as on-device asserts, without a host read: on CPU (compiled) a
    ``RuntimeError`` when the step runs; on CUDA a device-side assert at the next synchronizing call."""
    _assert_no_invalid_rank(counts, f"SyncBatchNorm got an invalid input on another rank {_STOP_HERE}")
    torch._assert_async(total != 1, _one_value_message("got "))


def _assert_no_invalid_rank(counts: Tensor, message: str) -> None:
    """On-device assert that no rank put the invalid-input marker in its count slot."""
    torch._assert_async((counts != stats.INVALID_COUNT).all(), message)


_STOP_HERE = "(see the error on that rank); all ranks stop here instead of waiting for it"


def input_error(input: Tensor, num_features: Optional[int]) -> Optional[str]:
    """Why ``input`` cannot be batch-normalized over ``num_features`` channels, or None if it can."""
    if input.dim() < 2:
        return f"expected at least 2D input (got {input.dim()}D input)"
    if num_features is not None and input.size(1) != num_features:
        return f"expected input with {num_features} channels in dimension 1 (got input of shape {list(input.shape)})"
    if not input.is_floating_point():
        return f"expected a floating-point input (got {input.dtype})"
    return None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, process_group: comm.ProcessGroup = None,
                    num_features: Optional[int] = None, identity: Optional[LayerIdentity] = None) -> Tensor:
    r"""Batch normalization whose batch statistics span all ranks of ``process_group``.

    Same arguments and result as :func:`torch.nn.functional.batch_norm` on the concatenation of every
    rank's ``input`` along dimension 0. It synchronizes only when ``training`` is True and the group
    has more than one rank; otherwise it *is* ``F.batch_norm``. When it synchronizes, all ranks of the
    group must call it, in the same order, including ranks whose batch is empty.

    A rank whose input is invalid (fewer than 2 dimensions, wrong channel count) still joins the
    statistics exchange with a marker, so every rank raises ``ValueError`` instead of waiting. A call
    while autograd runs a backward pass (a checkpoint's recompute) syncs too, as every rank recomputes
    at the same point of its backward, and leaves the running statistics alone: the step counts once.

    Args:
        input: ``(N, C, *)`` tensor; ``N`` may be 0 and may differ between ranks.
        running_mean, running_var: ``(C,)`` buffers updated in place with the global mean and the
            unbiased global variance, or None.
        weight, bias: ``(C,)`` affine parameters, or None.
        training: use (global) batch statistics; when False, the running statistics.
        momentum: weight of the new statistics in the running averages.
        eps: added to the variance for numerical stability.
        process_group: group to synchronize over; None means the default group.
        num_features: expected channel count, for the error message of a mismatching input;
            defaults to the length of ``weight``/``bias``/``running_mean``/``running_var``.
        identity: the layer's identity in the collectives (as :class:`syncnorm.SyncBatchNorm` passes
            its own), checked on every rank; None: all such calls share one identity.

    Example::

        >>> y = sync_batch_norm(x, running_mean, running_var, weight, bias, training=True)
    """
    expected = num_features if num_features is not None else next(
        (t.numel() for t in (weight, bias, running_mean, running_var) if t is not None), None)
    process_group = comm.resolve_group(process_group)  # a DeviceMesh (dimension) -> its group
    synced = training and comm.world_size(process_group) > 1
    if synced and is_compiling():
        check_compile_supported()
    problem = input_error(input, expected)
    if problem is not None:
        if synced and expected is not None:
            dtype = stats.stats_dtype(input.dtype) if input.is_floating_point() else torch.float32
            zeros = torch.zeros(expected, dtype=dtype, device=input.device)
            identity = FUNCTIONAL if identity is None else identity
            width = _packet_width(expected, identity, zeros, process_group)
            tail = identity.tail(zeros, 0, expected, width - HEAD - 2 * expected)
            packet = stats.pack_synced(stats.INVALID_COUNT, zeros, zeros, tail)  # marks this rank's input invalid
            gathered = comm.all_gather(packet, process_group)
            if is_compiling():
                # A raise would stop the trace before the marker is sent, leaving the other ranks to
                # time out; an assert that fails when the graph runs sends it first (the gathered
                # counts include this rank's marker, so it always fails).
                _assert_no_invalid_rank(gathered.select(1, 0), f"SyncBatchNorm {problem}")
                return input
        raise ValueError(f"SyncBatchNorm {problem}")
    if not synced:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, eps, momentum, process_group, identity, is_recompute(input)
    )
