"""``SyncBatchNormAct``: synced batch norm fused with an invertible activation that keeps only its output
for backward (after In-Place Activated BatchNorm, Rota Bulo et al., CVPR 2018). Backward rebuilds
``z = act^-1(y)``, ``dz = dy * act'(z)`` and ``x_hat = (z - bias) / weight`` from the output ``y``, one
testable function per step. Weight rule (the inversion divides by the weight): docs/semantics.md,
'SyncBatchNormAct'.
"""

import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm import comm, stats
from syncnorm._compat import is_compiling
from syncnorm._identity import unnumbered
from syncnorm._recompute import is_recompute
from syncnorm.functional import input_error, start_global_grad_sums, sync_batch_norm, synced_forward_stats
from syncnorm.module import SyncBatchNorm

ACTIVATIONS = ("identity", "leaky_relu", "elu")


def effective_weight(weight: Tensor, eps: float, abs_weight: bool = False) -> Tensor:
    """The weight rule: ``weight`` where ``|weight| >= eps``, else ``eps`` with the weight's sign; with
    ``abs_weight``, InPlace-ABN's ``|weight| + eps`` (what a converted timm ``InplaceAbn`` computes)."""
    if abs_weight:
        return weight.abs() + eps
    return torch.copysign(weight.abs().clamp_min(eps), weight)


def activation_problem(activation: str, param: float) -> Optional[str]:
    """Why ``activation`` with its parameter (slope or alpha) cannot be inverted, or None if it can."""
    if activation not in ACTIVATIONS:
        return f"expected activation to be one of {', '.join(ACTIVATIONS)} (got {activation!r})"
    if activation != "identity" and not param > 0:
        name = "negative_slope" if activation == "leaky_relu" else "alpha"
        return f"expected {name} > 0 for an invertible {activation} (got {param})"
    return None


def activate_(out: Tensor, activation: str, param: float) -> Tensor:
    """Apply the activation to ``out`` in place."""
    if activation == "leaky_relu":
        return F.leaky_relu_(out, param)
    if activation == "elu":
        return F.elu_(out, param)
    return out


def invert(output: Tensor, grad_output: Tensor, activation: str, param: float, dtype: torch.dtype
           ) -> Tuple[Tensor, Tensor]:
    """``(z, dz)`` from the output ``y = act(z)`` and its gradient, in ``dtype``: the activation's input
    and the gradient with respect to it (``dy * act'(z)``, read from ``y``)."""
    y = stats.as_dtype(output, dtype)
    grad = stats.as_dtype(grad_output, dtype)
    if activation == "leaky_relu":
        # y < 0 exactly where z < 0 (slope > 0): z = y / slope there, and dz = dy * slope.
        z = F.leaky_relu(y, 1.0 / param)
        return z, torch.ops.aten.leaky_relu_backward(grad, y, param, True)
    if activation == "elu":
        # y = alpha * (exp(z) - 1) < 0 where z < 0: z = log1p(y / alpha), dz = dy * (y + alpha). Where y
        # rounded to -alpha, z is lost and the smallest finite value stands in (docs/semantics.md).
        z = torch.where(y < 0, torch.log1p((y / param).clamp_min(torch.finfo(dtype).eps - 1)), y)
        return z, torch.ops.aten.elu_backward(grad, param, 1, 1, True, y)
    return y, grad


def normalized_sums(z: Tensor, grad_z: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(dz)`` and ``sum(dz * x_hat)`` with ``x_hat = (z - bias) / weight``, in one pass:
    the weight and bias gradients, and what the input gradient needs summed over ranks."""
    if stats.local_count(z) == 0:
        zeros = grad_z.sum(dim=stats.reduce_dims(grad_z))  # from grad_z: see stats.local_stats
        return zeros, zeros.clone()
    # Training-mode native backward with bias as the "mean" and 1 / weight as the "invstd" gives
    # sum(dz * (z - bias) / weight) and sum(dz), and nothing else.
    _, sum_dz_xhat, sum_dz = torch.ops.aten.native_batch_norm_backward(
        grad_z, z, None, None, None, bias, weight.reciprocal(), True, 0.0, [False, True, True])
    return sum_dz, sum_dz_xhat


def input_grad(z: Tensor, grad_z: Tensor, weight: Tensor, bias: Tensor, var: Tensor, eps: float,
               total: stats.Scalar, sums: Tensor, overwrite_z: bool = False) -> Tensor:
    """``dx = weight * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` from the global
    ``sums = [sum(dz)..., sum(dz * x_hat)...]``, as ``a * dz + b * z + c`` per channel; with ``overwrite_z``,
    into ``z``'s memory (fresh memory costs page faults on every step)."""
    if z.numel() == 0:
        return grad_z.mul(0)
    invstd = torch.rsqrt(var + eps)
    mean_dz, mean_dz_xhat = (sums.view(2, -1) / total).unbind(0)
    a = weight * invstd
    b = -invstd * mean_dz_xhat
    c = -a * mean_dz - b * bias
    shape = stats.channel_shape(z)
    grad = torch.addcmul(c.view(shape), z, b.view(shape), out=z if overwrite_z else None)
    return grad.addcmul_(grad_z, a.view(shape))


class SyncBatchNormActFunction(torch.autograd.Function):
    """Synced batch norm + activation that saves only its output and per-channel tensors. All ranks of
    ``process_group`` must call it; packets, checks and collectives are ``SyncBatchNormFunction``'s."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, identity,
                activation, param, inplace, recompute=False, abs_weight=False):
        mean, var, tail = synced_forward_stats(
            ctx, input, running_mean, running_var, eps, momentum, process_group, identity, recompute)
        ctx.activation, ctx.param = activation, param
        ctx.param_dtype = input.dtype if weight is None else weight.dtype
        if inplace:
            ctx.mark_dirty(input)
        if mean is None:  # every rank's batch is empty (known on the host): backward sends nothing
            ctx.save_for_backward(None, None, None, None, None, None)
            return input if inplace else torch.empty_like(input)
        # The weight gradient: the effective weight's, times its sign with abs_weight (else straight through).
        sign = weight.detach().sign() if abs_weight and weight is not None else None
        weight = torch.ones_like(mean) if weight is None else effective_weight(
            stats.as_dtype(weight, mean.dtype), eps, abs_weight)
        bias = torch.zeros_like(mean) if bias is None else stats.as_dtype(bias, mean.dtype)
        if inplace:
            # y = x * a + (bias - mean * a), a = weight * invstd, written over the input.
            scale = weight * torch.rsqrt(var + eps)
            shape = stats.channel_shape(input)
            torch.addcmul((bias - mean * scale).view(shape), input, scale.view(shape), out=input)
            output = input  # the input object itself: what mark_dirty expects back
        else:
            output = stats.normalize(input, mean, var, weight, bias, eps)
        activate_(output, activation, param)
        ctx.save_for_backward(output, weight, bias, var, sign, tail)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        output, weight, bias, var, sign, tail = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if output is None:  # every rank's batch is empty: no sums to send
            grad_input = grad_output.mul(0) if need_input else None
            sum_dz = torch.zeros(grad_output.size(1), dtype=ctx.param_dtype, device=grad_output.device)
            sum_dz_xhat = sum_dz.clone()
        else:
            z, grad_z = invert(output, grad_output, ctx.activation, ctx.param, var.dtype)
            sum_dz, sum_dz_xhat = normalized_sums(z, grad_z, weight, bias)
            if need_input:  # every rank knows this: the collective is skipped on all or none
                finish = start_global_grad_sums(sum_dz, sum_dz_xhat, ctx.identity, ctx.process_group, ctx.route, tail)
                grad_input = input_grad(z, grad_z, weight, bias, var, ctx.eps, ctx.total, finish(), z is not output)
                grad_input = stats.as_dtype(grad_input, output.dtype)
            if sign is not None:
                sum_dz_xhat = sum_dz_xhat * sign
        # Local, as in SyncBatchNorm: DDP averages parameter gradients.
        grad_weight, grad_bias = (stats.as_dtype(sums, ctx.param_dtype) for sums in (sum_dz_xhat, sum_dz))
        return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None) + (None,) * 11


def inplace_problem(input: Tensor) -> Optional[str]:
    """Why autograd can see that writing over ``input`` would lose a value it needs, or None."""
    if not (input.requires_grad and torch.is_grad_enabled()):
        return None
    if input.is_leaf:
        return ("expected an input that is not a leaf tensor requiring grad (got a leaf that requires grad); "
                "pass inplace=False, or feed the output of another op")
    node = input.grad_fn
    for name in dir(node):  # the op that made the input saved it for its own backward (ReLU, sigmoid...)
        if name.startswith("_saved_"):
            try:
                saved = getattr(node, name)
            except RuntimeError:  # already freed
                continue
            if isinstance(saved, Tensor) and saved.data_ptr() == input.data_ptr() and saved.numel():
                return (f"expected an input that no autograd node saved for backward (got one that "
                        f"{type(node).__name__} saved): pass inplace=False, or make that op not in place")
    return None


class SyncBatchNormAct(SyncBatchNorm):
    r""":class:`syncnorm.SyncBatchNorm` fused with an invertible activation that keeps only its output (and
    per-channel tensors) for backward: ``act(BatchNorm(x))`` over every rank's batch, exactly
    ``BatchNorm`` + ``nn.LeakyReLU(negative_slope)`` / ``nn.ELU(alpha)`` on the global batch, except that a
    weight with ``|weight| < eps`` is used as ``eps`` with its sign. Unsynced it is ``F.batch_norm`` and the
    activation. What it saves and recomputes, ``inplace``'s limits: docs/semantics.md, 'SyncBatchNormAct'.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype: as in
            :class:`syncnorm.SyncBatchNorm`.
        activation: ``"leaky_relu"``, ``"elu"`` or ``"identity"``. Default: ``"leaky_relu"``
        negative_slope: LeakyReLU's slope for negative inputs, above 0. Default: 0.01
        alpha: ELU's ``alpha``, above 0. Default: 1.0
        inplace: a synced training step writes its result over the input's memory; ``ValueError`` where
            autograd can see that the input is needed (a leaf that requires grad, an input its own op
            saved). Default: False

    Its ``state_dict`` keys are BatchNorm's. Example::

        >>> layer = syncnorm.SyncBatchNormAct(64, activation="leaky_relu", negative_slope=0.01)
        >>> model = syncnorm.convert_sync_batchnorm_act(model)   # fuses BatchNorm -> LeakyReLU/ELU pairs
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: comm.ProcessGroup = None,
                 activation: str = "leaky_relu", negative_slope: float = 0.01, alpha: float = 1.0,
                 inplace: bool = False, device=None, dtype=None) -> None:
        problem = activation_problem(activation, alpha if activation == "elu" else negative_slope)
        if problem is not None:
            raise ValueError(f"SyncBatchNormAct {problem}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        self.activation, self.negative_slope, self.alpha, self.inplace = activation, negative_slope, alpha, inplace
        self._abs_weight = False  # InPlace-ABN's weight rule, for a converted timm InplaceAbn

    def _param(self) -> float:
        return self.alpha if self.activation == "elu" else self.negative_slope

    def forward(self, input: Tensor) -> Tensor:
        if self.inplace and not is_compiling():
            problem = inplace_problem(input)
            if problem is not None:
                raise ValueError(f"SyncBatchNormAct(inplace=True) {problem}")
        return super().forward(input)

    def _local_forward(self, input, running_mean, running_var, use_batch_stats, average_factor):
        """Unsynced (eval, one rank): BatchNorm and the activation as torch ops, with the weight rule."""
        weight = self.weight
        if weight is not None:  # the gradient passes straight through the rule (abs_weight: the rule's own)
            rule = effective_weight(weight, self.eps, self._abs_weight)
            weight = rule if self._abs_weight else weight + (rule - weight).detach()
        output = F.batch_norm(input, running_mean, running_var, weight, self.bias, use_batch_stats,
                              average_factor, self.eps)
        return activate_(output, self.activation, self._param())

    def _synced_forward(self, input, running_mean, running_var, average_factor):
        if input_error(input, self.num_features) is not None:  # every rank raises: sync_batch_norm's marker
            return sync_batch_norm(input, None, None, training=True, process_group=self.process_group,
                                   num_features=self.num_features, identity=self._identity)
        return SyncBatchNormActFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, average_factor, self.process_group,
            self._identity, self.activation, self._param(), self.inplace, is_recompute(input), self._abs_weight)

    def extra_repr(self) -> str:
        param = {"identity": "", "leaky_relu": f", negative_slope={self.negative_slope}",
                 "elu": f", alpha={self.alpha}"}[self.activation]
        inplace = ", inplace=True" if self.inplace else ""
        return f"{super().extra_repr()}, activation={self.activation}{param}{inplace}"


class FusedActivation(nn.Identity):
    """The ``nn.Sequential`` slot of an activation that a :class:`SyncBatchNormAct` before it took over: an
    identity that keeps the original module (not as a child: the state_dict is unchanged), which
    :func:`syncnorm.revert_sync_batchnorm` puts back."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.__dict__["_syncnorm_original"] = original

    def extra_repr(self) -> str:
        return f"fused into the SyncBatchNormAct before it: {self._syncnorm_original!r}"


def _fusion(layer: nn.Module, following: Optional[nn.Module]):
    """``(activation, param, takes_following, abs_weight)`` when ``layer`` (and the module after it in a
    Sequential) fuses into a SyncBatchNormAct; a string saying why a candidate cannot fuse exactly; None
    for anything else (left to convert_sync_batchnorm)."""
    timm = sys.modules.get("timm.layers.norm_act"), sys.modules.get("timm.layers.inplace_abn")
    if timm[1] is not None and type(layer) is timm[1].InplaceAbn:  # InPlace-ABN's rule: |weight| + eps
        problem = activation_problem(layer.act_name, layer.act_param)
        return problem or (layer.act_name, layer.act_param, False, True)
    if isinstance(layer, SyncBatchNorm) or not isinstance(layer, _BatchNorm):
        return None
    if timm[0] is not None and type(layer) is timm[0].BatchNormAct2d:
        act, takes_following = layer.act, False
        if _activation_of(act) is not None and not isinstance(layer.drop, nn.Identity):
            return f"got a {type(layer.drop).__name__} between the normalization and the activation"
    elif type(layer).forward is _BatchNorm.forward and type(following) in (nn.LeakyReLU, nn.ELU):
        act, takes_following = following, True
    else:
        return None
    name_param = _activation_of(act)
    if name_param is None:
        return None
    return activation_problem(*name_param) or name_param + (takes_following, False)


def _activation_of(act: nn.Module):
    if type(act) is nn.LeakyReLU:
        return "leaky_relu", act.negative_slope
    if type(act) is nn.ELU:
        return "elu", act.alpha
    return ("identity", 0.0) if type(act) is nn.Identity else None


def convert_sync_batchnorm_act(module: nn.Module, process_group: comm.ProcessGroup = None) -> nn.Module:
    """``convert_sync_batchnorm`` that also fuses BatchNorm + invertible activation into :class:`SyncBatchNormAct`:
    a BatchNorm followed by ``nn.LeakyReLU``/``nn.ELU`` in an ``nn.Sequential`` (the activation's slot
    becomes a :class:`FusedActivation`), timm's ``BatchNormAct2d`` and ``InplaceAbn`` (docs/integrations.md
    has the table). ``ValueError`` naming the layer (nothing is changed) for a candidate that cannot fuse
    exactly; :func:`syncnorm.revert_sync_batchnorm` gives back the original modules.
    """
    from syncnorm import convert

    plans, problems = [], []
    for path, parent in module.named_modules():
        children = list(parent.named_children())
        sequential = isinstance(parent, nn.Sequential)
        for index, (name, child) in enumerate(children):
            plan = _fusion(child, children[index + 1][1] if sequential and index + 1 < len(children) else None)
            where = f"'{path}.{name}'" if path else f"'{name}'"
            if isinstance(plan, str):
                problems.append(f"{where} ({type(child).__name__}): {plan}")
            elif plan is not None:
                plans.append((parent, children, index, plan))
    if problems:
        raise ValueError(f"convert_sync_batchnorm_act expected BatchNorm + activation it can fuse exactly (got "
                         f"{'; '.join(problems)}); nothing was changed")
    convert._load_integrations()
    convert._check_all(module, "convert_sync_batchnorm_act", "BatchNorm layers it can sync exactly",
                       convert._convert_problem)
    for parent, children, index, (activation, param, takes_following, abs_weight) in plans:
        name, layer = children[index]
        with unnumbered():  # convert_sync_batchnorm names it by its path below
            fused = SyncBatchNormAct(layer.num_features, layer.eps, layer.momentum, layer.affine,
                                     getattr(layer, "track_running_stats", True), process_group, activation=activation,
                                     negative_slope=param, alpha=param if activation == "elu" else 1.0, device="meta")
        convert._carry(layer, fused)
        if not hasattr(layer, "num_batches_tracked"):  # InplaceAbn keeps no step count
            fused._buffers["num_batches_tracked"] = None
        fused._original_class, fused._abs_weight = type(layer), abs_weight
        setattr(parent, name, fused)
        if takes_following:
            setattr(parent, children[index + 1][0], FusedActivation(children[index + 1][1]))
    return convert.convert_sync_batchnorm(module, process_group)
