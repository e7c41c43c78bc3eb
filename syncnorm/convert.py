"""Model walkers: ``convert_sync_batchnorm`` (BatchNorm -> syncnorm) and ``revert_sync_batchnorm``."""

import copy
from typing import Dict, Optional, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm import comm
from syncnorm.module import SyncBatchNorm


class BatchNormNd(_BatchNorm):
    """Plain (local) batch norm that accepts 2D to 5D input: what ``revert_sync_batchnorm`` builds for
    a SyncBatchNorm whose original BatchNorm class is unknown."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")


# What convert_sync_batchnorm turns into SyncBatchNorm: every BatchNorm flavour, torch's own SyncBN
# included (it refuses CPU tensors). Lazy modules are left alone: they have no shape to copy yet.
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PLAIN_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormNd)


def _transfer_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Make ``target`` use ``source``'s very parameter and buffer objects, mode and extra attributes.

    Sharing the objects (not copying them) keeps ``requires_grad``, device, dtype, the model's
    state_dict, and any optimizer or DDP reducer that already holds the parameters.
    """
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    if source.track_running_stats:
        target.running_mean = source.running_mean
        target.running_var = source.running_var
        target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def _replace_modules(module: nn.Module, make, memo: Dict[int, nn.Module]) -> nn.Module:
    """Rebuild ``module``'s tree, replacing each layer for which ``make`` returns a new one.

    A layer shared by several parents is replaced once and stays shared.
    """
    if id(module) in memo:
        return memo[id(module)]
    replacement = make(module)
    if replacement is None:
        replacement = module
        for name, child in list(module.named_children()):
            new_child = _replace_modules(child, make, memo)
            if new_child is not child:
                setattr(module, name, new_child)
    memo[id(module)] = replacement
    return replacement


def convert_sync_batchnorm(module: nn.Module, process_group: comm.ProcessGroup = None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (and ``torch.nn.SyncBatchNorm``) in ``module`` by
    :class:`syncnorm.SyncBatchNorm`, and return the converted module.

    The root itself is converted if it is a BatchNorm, and the walk goes through any container,
    ``DistributedDataParallel`` included. Converted layers take over the original parameter and buffer
    objects, so ``requires_grad``, device, dtype, train/eval mode, the model's ``state_dict`` and any
    optimizer built before the call are all unchanged. Children are replaced in place; use the return
    value, which differs from ``module`` only when the root is a BatchNorm.

    Convert before wrapping the model in ``DistributedDataParallel``, so DDP sees the final layers.

    Args:
        module: the model (or a single layer).
        process_group: group whose ranks share statistics in every converted layer; None means the
            default (world) group.

    Example::

        >>> model = syncnorm.convert_sync_batchnorm(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if not isinstance(layer, _CONVERTIBLE) or isinstance(layer, nn.modules.lazy.LazyModuleMixin):
            return None
        synced = SyncBatchNorm(
            layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
            process_group=process_group, device="meta",
        )
        # Remember what to give back in revert_sync_batchnorm (torch's SyncBN is not "plain").
        synced._original_class = type(layer) if isinstance(layer, _PLAIN_BATCHNORM) else None
        return _transfer_state(layer, synced)

    return _replace_modules(module, make, {})


def revert_sync_batchnorm(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``module`` with every :class:`syncnorm.SyncBatchNorm` (and ``torch.nn.SyncBatchNorm``)
    replaced by a plain, local BatchNorm, for inference, export or single-process use.

    A layer made by :func:`convert_sync_batchnorm` gets its original class back (e.g.
    ``BatchNorm2d``); any other becomes :class:`syncnorm.convert.BatchNormNd`, which accepts 2D to 5D
    input. Values of parameters and buffers, ``requires_grad``, train/eval mode and the ``state_dict``
    keys are kept.

    What is shared with ``module``:

    - ``inplace=False`` (default): nothing. The result is a deep copy (``copy.deepcopy``: parameters
      and buffers copied, gradients left behind), so ``module`` keeps syncing and training untouched
      (export every epoch from a model that is still training). Process
      groups are not copied; the reverted layers do not hold one. ``module`` must be the model, not
      its ``DistributedDataParallel`` wrapper: pass ``ddp_model.module``.
    - ``inplace=True``: children are replaced in ``module`` itself (as ``convert_sync_batchnorm``
      does), and each reverted layer holds the very parameter and buffer objects of the layer it
      replaces, so an optimizer built on ``module`` keeps working. ``module`` no longer syncs. The
      return value differs from ``module`` only when the root is a SyncBatchNorm. This is what a
      Lightning ``LayerSync`` plugin needs at teardown.

    Args:
        module: the model (or a single layer).
        inplace: revert ``module`` itself instead of a copy. Default: False

    Example::

        >>> model = syncnorm.revert_sync_batchnorm(ddp_model.module).eval()   # a copy
        >>> torch.onnx.export(model, (example,), "model.onnx")
    """
    if not inplace:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "revert_sync_batchnorm(inplace=False) expected the model (got its DistributedDataParallel "
                "wrapper): pass ddp_model.module, or inplace=True to revert the wrapped model itself"
            )
        # Process groups cannot be copied, and the reverted layers drop them anyway: share them.
        memo = {
            id(layer.process_group): layer.process_group
            for layer in module.modules()
            if isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm)) and layer.process_group is not None
        }
        try:
            module = copy.deepcopy(module, memo)
        except (TypeError, RuntimeError) as error:
            raise TypeError(
                f"revert_sync_batchnorm(inplace=False) copies the model, and this one cannot be "
                f"deep-copied ({error}); pass inplace=True to revert it in place"
            ) from error

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if not isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm)):
            return None
        plain_class: Type[_BatchNorm] = getattr(layer, "_original_class", None) or BatchNormNd
        plain = plain_class(
            layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
            device="meta",
        )
        return _transfer_state(layer, plain)

    return _replace_modules(module, make, {})
