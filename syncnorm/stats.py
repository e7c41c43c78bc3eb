"""Batch-norm arithmetic for one process: local statistics, their exact combination, the backward formula.

Nothing in this file talks to other processes (that is ``comm.py``), so every function here can be
tested in a single process against a closed form. Statistics for half-precision inputs accumulate in
float32, float64 inputs stay float64.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from syncnorm._compat import is_compiling

# A count (or momentum) that is either a Python number, known on the host, or a 0-dim tensor that stays
# on the device (CUDA tensors and anything under torch.compile: reading it would be a host sync).
Scalar = Union[float, Tensor]

# Count field a rank puts in its statistics packet when its own input was invalid; the other ranks see
# it after the all_gather and raise too, so a bad input fails on every rank instead of hanging the rest.
INVALID_COUNT = -1.0
# Count field of a packet that asks the group for a larger packet width (functional.py).
WIDTH_REQUEST = -2.0


def as_dtype(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``tensor.to(dtype)``, skipping the call when it would be a no-op (it still costs a dispatch); None stays."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in for an input of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_shape(input: Tensor) -> List[int]:
    """Shape that broadcasts a per-channel vector against ``input``: ``[1, C, 1, ...]``."""
    return [1, input.size(1)] + [1] * (input.dim() - 2)


def reduce_dims(input: Tensor) -> List[int]:
    """The dimensions a per-channel statistic reduces over: the batch and every spatial one."""
    return [0] + list(range(2, input.dim()))


def local_count(input: Tensor) -> int:
    """Number of values each channel has in ``input`` (batch times spatial size)."""
    return input.numel() // input.size(1) if input.size(1) else 0


def local_stats(input: Tensor) -> Tuple[int, Tensor, Tensor]:
    """``(count, mean, biased variance)`` per channel of this process's ``input`` (zeros for an empty one):
    eagerly the native statistics kernel (one pass, channels_last aware); compiled ``var_mean``, which the
    compiler fuses (the native kernel has no fake-tensor implementation)."""
    count = local_count(input)
    channels = input.size(1)
    dtype = stats_dtype(input.dtype)
    dims = reduce_dims(input)
    if count == 0:
        # Zeros computed *from the input* (a sum over nothing): under torch.compile the partitioner copies into
        # the backward graph every forward op that does not depend on a forward input, which made an empty
        # rank's statistics all_gather run again in its backward, out of step with the other ranks.
        zeros = input.sum(dim=dims, dtype=dtype)
        return 0, zeros, zeros.clone()
    if is_compiling():
        var, mean = torch.var_mean(as_dtype(input, dtype), dim=dims, correction=0)
        return count, mean, var
    # For a half input, throwaway float32 running buffers (momentum 0) make the kernel accumulate and return float32.
    scratch = (None, None) if input.dtype == dtype else torch.zeros(2, channels, dtype=dtype, device=input.device)
    mean, var = torch.batch_norm_update_stats(input, scratch[0], scratch[1], 0.0)
    return count, mean, var


def pack_synced(count: float, mean: Tensor, var: Tensor, tail: Tensor) -> Tensor:
    """One flat gather packet ``[count, tail..., mean..., var...]``, so one collective carries all of them.

    A synced layer's ``tail`` is its head from ``LayerIdentity.tail`` (channel count, identity, padding): the
    count sits with the identity so that one small read at the front shows both, whatever the channel
    count. ``update_bn_stats`` sends an empty tail."""
    return torch.cat((mean.new_full((1,), count), tail, mean, var))


def empty_share(packet: Tensor, width: int) -> Tensor:
    """What an empty batch of the same layer and phase sends in a packet of ``width`` floats, from a
    ``pack_synced`` packet: count, mean and variance zero; channel count and identity kept
    (``syncnorm.join``'s stand-in; its recorded packet may be narrower than the group's packets now)."""
    head = packet.numel() - 2 * int(packet[1])  # count, channel count, identity, padding
    share = packet.new_zeros(width)
    share[1:head] = packet[1:head]
    return share


def combine_stats(counts: Tensor, means: Tensor, vars: Tensor) -> Tuple[Tensor, Tensor]:
    """Global mean and biased variance from per-rank ``(count, mean, biased variance)``, by Chan et al.'s
    ``M2 = sum_r n_r * (var_r + (mean_r - mean)^2)``: no term is negative, so unlike ``E[x^2] - E[x]^2``
    nothing cancels when ``|mean| >> std``. Empty ranks add nothing; all empty gives zeros, not NaN."""
    # Counts are whole numbers: clamping the total at 1 changes nothing unless it is 0.
    total = counts.sum().clamp_min(1)
    weights = (counts / total).unsqueeze(1)
    global_mean = (weights * means).sum(0)
    deviation = means - global_mean
    global_var = (weights * (vars + deviation * deviation)).sum(0)
    return global_mean, global_var


def unpack_synced(gathered: Tensor, channels: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Counts ``(world,)``, means and variances ``(world, C)`` of a gather of ``pack_synced`` packets."""
    return gathered[:, 0], gathered[:, -2 * channels : -channels], gathered[:, -channels:]


def combine_gathered(gathered: Tensor, counts: List[float], channels: int) -> Tuple[Tensor, Tensor]:
    """``combine_stats`` of a gather of ``pack_synced`` packets whose counts are already in Python.

    Two ranks (the common CPU case) take Chan's pairwise form, three small element-wise ops instead of
    ``combine_stats``' ten (on per-channel vectors dispatch dominates). ``sum(counts)`` must be more than zero.
    """
    if len(counts) != 2:
        return combine_stats(*unpack_synced(gathered, channels))
    total = counts[0] + counts[1]
    weight_a, weight_b = counts[0] / total, counts[1] / total
    sizes = [gathered.size(1) - 2 * channels, channels, channels]
    row_a, row_b = gathered.unbind(0)
    # Ops over whole packets (count and tail slots ignored), cut with one split each: lerp with weight n_b / n
    # is the count-weighted average, i.e. the global mean and the within-rank part of the variance.
    _, global_mean, global_var = row_a.lerp(row_b, weight_b).split_with_sizes(sizes)
    _, delta, _ = row_b.sub(row_a).split_with_sizes(sizes)
    # Between-rank part: n_a n_b / n^2 * (mean_b - mean_a)^2, a difference of means, no cancellation.
    global_var.addcmul_(delta, delta, value=weight_a * weight_b)
    return global_mean, global_var


def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    total_count: Scalar,
    momentum: Scalar,
) -> None:
    """Exponential moving average of the global mean and the *unbiased* global variance, in place.

    ``total_count`` as a Python number must be at least 2. As a 0-dim tensor (kept on the device) it may
    be 0, and then the buffers stay as they are, as in BatchNorm on an empty batch; a total of 1 is the
    caller's error to report.
    """
    if torch.is_grad_enabled():  # entering no_grad costs more than the update when already off
        with torch.no_grad():
            return update_running_stats(running_mean, running_var, mean, var, total_count, momentum)
    if isinstance(total_count, Tensor) or isinstance(momentum, Tensor):  # no host read of either
        total_count = torch.as_tensor(total_count, dtype=mean.dtype, device=mean.device)
        # An all-empty global batch leaves the buffers alone: lerp with weight 0 returns them unchanged,
        # and the statistics of an empty batch are finite zeros (see combine_stats).
        weight = (total_count > 0).to(mean.dtype) * momentum
        # n / (n - 1), with the denominator kept at 1 or more: n is 0 (weight 0) or at least 2 here.
        unbiased_var = var * (total_count / (total_count - 1).clamp_min(1))
        for buffer, value in ((running_mean, mean), (running_var, unbiased_var)):
            if buffer is not None:
                buffer.lerp_(as_dtype(value, buffer.dtype), as_dtype(weight, buffer.dtype))
        return
    if running_mean is not None:
        running_mean.lerp_(as_dtype(mean, running_mean.dtype), momentum)
    if running_var is not None:
        var = as_dtype(var, running_var.dtype)
        # (1 - m) * running + m * var * n / (n - 1) as a lerp to the biased variance plus m * var / (n - 1):
        # scalars as lerp weight and add alpha cost a fraction of a tensor-times-Python-number op.
        running_var.lerp_(var, momentum).add_(var, alpha=momentum / (total_count - 1))


def normalize(
    input: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` with the given statistics, in one native pass
    (the kernel batch norm uses in eval mode), keeping the input's dtype and memory format."""
    if input.numel() == 0:
        # From the input, keeping its memory format (the kernel does not when empty): under torch.compile an
        # allocation is an untied `empty`, and so would be every synced collective downstream (see local_stats).
        return input.mul(0)
    # The op F.batch_norm ends in, called directly (its wrapper costs more than the kernel on small inputs),
    # with the parameters in the statistics dtype: the kernel takes half inputs only with float32 parameters.
    return torch.native_batch_norm(
        input, as_dtype(weight, mean.dtype), as_dtype(bias, mean.dtype), mean, var, False, 0.0, eps
    )[0]


def grad_sums_scaled(
    grad_output: Tensor, input: Tensor, mean: Tensor, var: Tensor, eps: float
) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``invstd * sum(dy * (x - mean))`` (the local weight gradient), in one
    pass, with ``invstd = 1 / sqrt(var + eps)``: the eval-mode native backward with the batch statistics as
    running statistics. Summed over ranks, the second is ``invstd`` times the global ``sum(dy * (x - mean))``,
    which is all ``input_grad_from_sums`` needs."""
    if local_count(input) == 0:
        # Zeros computed from grad_output, for the reason given in local_stats: made from nothing, the
        # backward sum's input would let the compiler run that collective in the forward graph too.
        zeros = grad_output.sum(dim=reduce_dims(grad_output), dtype=mean.dtype)
        return zeros, zeros.clone()
    _, grad_weight, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_output, input, None, mean, var, None, None, False, eps, [False, True, True]
    )
    return sum_dy, grad_weight


def input_grad_scales(
    input: Tensor, var: Tensor, eps: float, weight: Optional[Tensor], total_count: Scalar
) -> Tuple[Tensor, Tensor]:
    """The parts of ``input_grad_from_sums`` that need no other rank's data: ``scale = weight * invstd``
    shaped to broadcast against ``input``, and ``-scale / total_count`` per channel.

    Split out so that they can be computed while the gradient sums are still in flight.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale.mul_(as_dtype(weight, scale.dtype))  # in place on the fresh invstd: one allocation less
    # total_count may be a 0-dim tensor on the device: no host read either way.
    return scale.view(channel_shape(input)), scale * (-1.0 / total_count)


def input_grad_from_sums(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    scales: Tuple[Tensor, Tensor],
    global_sums: Tensor,
) -> Tensor:
    """Gradient w.r.t. the input from ``global_sums = [sum(dy), invstd * sum(dy * (x - mean))]`` over all ranks
    and ``scales = input_grad_scales(...)``:
    ``dx = weight * invstd * (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu)`` with the global means, as
    ``scale * dy + slope * (x - mean) * invstd + offset`` per channel, ``scale = weight * invstd``: one native
    eval-mode batch-norm pass over ``x`` (it applies ``invstd`` itself) writes the last two terms and
    ``addcmul_`` adds the first in place."""
    if input.numel() == 0:
        # From grad_output (the output's shape and memory format), not allocated or made from input: under
        # torch.compile a gradient independent of the incoming one is computed in the forward graph, and with it
        # the backward sums of the layers before this one (see local_stats), which then pair with wrong collectives.
        return grad_output.mul(0)
    scale, scale_over_count = scales
    # Both coefficients in one op: row 0 is the offset -scale * mean_dy, row 1 the slope
    # -scale * invstd * mean_dy_xmu (the kernel multiplies by the other invstd).
    offset, slope = global_sums.view(2, -1).mul(scale_over_count).unbind(0)
    # A half-precision input is computed in float32 and rounded once, as BatchNorm's own backward does (the
    # kernel would round its partial result and addcmul_ again: about 1 ulp off).
    grad_input = torch.native_batch_norm(as_dtype(input, mean.dtype), slope, offset, mean, var, False, 0.0, eps)[0]
    return as_dtype(grad_input.addcmul_(as_dtype(grad_output, mean.dtype), scale), input.dtype)
