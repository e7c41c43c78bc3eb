"""Normalization registry: ``model.norm`` name -> layer factory.

Every factory has the signature ``factory(num_features, dim=2)``: ``dim=2`` for conv feature maps
``(N, C, H, W)``, ``dim=1`` for fully connected features ``(N, C)``. Models ask the registry for a layer
and never name a normalization class themselves.

``syncbn`` builds plain ``nn.BatchNorm1d/2d`` layers; the model builder turns them into
:class:`syncnorm.SyncBatchNorm` with a single :func:`syncnorm.convert_sync_batchnorm` call on the whole
model (``NORMS[name].convert`` says whether to). That keeps the conversion walker on the real path.
``syncbn_act`` does the same with :func:`syncnorm.convert_sync_batchnorm_act`, which also fuses each
BatchNorm + LeakyReLU pair into one :class:`syncnorm.SyncBatchNormAct` (``NORMS[name].fuse_act``).
"""

from dataclasses import dataclass
from typing import Callable, Dict

from torch import nn

# GroupNorm uses at most this many groups and at least two channels per group.
MAX_GROUPS = 32


def _batch_norm(num_features: int, dim: int = 2) -> nn.Module:
    return nn.BatchNorm2d(num_features) if dim == 2 else nn.BatchNorm1d(num_features)


def group_count(num_features: int) -> int:
    """Groups for ``gn``: the largest divisor of C that is at most 32 and leaves >= 2 channels a group."""
    for groups in range(min(MAX_GROUPS, num_features // 2), 0, -1):
        if num_features % groups == 0:
            return groups
    return 1


def _group_norm(num_features: int, dim: int = 2) -> nn.Module:
    return nn.GroupNorm(group_count(num_features), num_features)


def _layer_norm(num_features: int, dim: int = 2) -> nn.Module:
    # One group: statistics over (C, H, W) per sample, with a per-channel affine. On (N, C) input this
    # is exactly nn.LayerNorm(C).
    return nn.GroupNorm(1, num_features)


def _instance_norm(num_features: int, dim: int = 2) -> nn.Module:
    # Instance norm needs a spatial extent; a fully connected feature has none (its per-sample,
    # per-channel variance is 0), so those layers get no normalization.
    if dim == 1:
        return nn.Identity()
    return nn.InstanceNorm2d(num_features, affine=True)


def _no_norm(num_features: int, dim: int = 2) -> nn.Module:
    return nn.Identity()


@dataclass(frozen=True)
class NormSpec:
    factory: Callable[..., nn.Module]
    convert: bool  # True: call syncnorm.convert_sync_batchnorm on the built model
    summary: str
    fuse_act: bool = False  # True: syncnorm.convert_sync_batchnorm_act instead (BN + activation -> one layer)


NORMS: Dict[str, NormSpec] = {
    "syncbn": NormSpec(_batch_norm, True, "BatchNorm with statistics over all ranks (syncnorm.SyncBatchNorm)"),
    "syncbn_act": NormSpec(_batch_norm, True, "BatchNorm + LeakyReLU fused into syncnorm.SyncBatchNormAct, synced "
                                              "over all ranks (lenet with model.act=leaky_relu)", fuse_act=True),
    "bn": NormSpec(_batch_norm, False, "BatchNorm with each rank's own batch statistics (not synced)"),
    "gn": NormSpec(_group_norm, False, "GroupNorm, up to 32 groups of >= 2 channels"),
    "ln": NormSpec(_layer_norm, False, "LayerNorm over (C, H, W) per sample (GroupNorm with one group)"),
    "in": NormSpec(_instance_norm, False, "InstanceNorm on conv layers; fully connected layers get none"),
    "none": NormSpec(_no_norm, False, "no normalization"),
}

NORM_NAMES = tuple(NORMS)


def make_norm(name: str, num_features: int, dim: int = 2) -> nn.Module:
    """Build one normalization layer; ``name`` must be a key of :data:`NORMS`."""
    try:
        spec = NORMS[name]
    except KeyError:
        raise ValueError(f"expected a norm name, one of {', '.join(NORM_NAMES)} (got {name!r})") from None
    return spec.factory(num_features, dim=dim)
