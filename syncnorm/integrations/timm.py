"""timm's BatchNorm + activation layers, synced.

timm builds most of its CNNs (EfficientNet, MobileNet, RegNet, CSP, ByobNet...) from ``BatchNormAct2d``:
a ``BatchNorm2d`` subclass whose ``forward`` applies a ``drop`` and an ``act`` module after the
normalization. Converted as plain BatchNorm, those layers would lose their activation. On import this
module registers (with :func:`syncnorm.register_conversion`):

- ``BatchNormAct2d`` -> :class:`SyncBatchNormAct2d`, which reverts to ``BatchNormAct2d``;
- timm's ``SyncBatchNormAct`` (what ``timm.layers.convert_sync_batchnorm`` makes: a
  ``torch.nn.SyncBatchNorm``, CUDA only) -> :class:`SyncBatchNormAct2d`, which reverts to
  ``BatchNormAct2d``.

Nothing to import by hand: :func:`syncnorm.convert_sync_batchnorm` and
:func:`syncnorm.revert_sync_batchnorm` import this module once ``timm`` is imported. A registration the
user made for these classes first is kept.
"""

from typing import Optional

from torch import Tensor, nn

try:
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
except ImportError as error:  # timm < 0.9 has no timm.layers
    raise ImportError(
        f"syncnorm.integrations.timm needs timm >= 0.9 (import failed: {error}); "
        f"install it: pip install 'timm>=0.9' (or syncnorm's 'timm' extra: pip install -e '.[timm]')"
    ) from error

from syncnorm import comm
from syncnorm.convert import _register_default
from syncnorm.module import SyncBatchNorm

__all__ = ["SyncBatchNormAct2d"]


class SyncBatchNormAct2d(SyncBatchNorm):
    """:class:`syncnorm.SyncBatchNorm` followed by a ``drop`` and an ``act`` module: timm's
    ``BatchNormAct2d`` with statistics over all ranks.

    In training the normalization uses the global batch's statistics (all ranks must run every
    forward and backward); then ``act(drop(y))`` as in ``BatchNormAct2d``. Converting a
    ``BatchNormAct2d`` keeps its very ``act`` and ``drop`` objects, and reverting gives them back to a
    ``BatchNormAct2d``; ``state_dict`` keys are the same as ``BatchNormAct2d``'s. Like it, it takes 4D
    input only.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype: as in
            :class:`syncnorm.SyncBatchNorm`.
        act: module applied last. Default: None (``nn.Identity``)
        drop: module applied between the normalization and ``act``. Default: None (``nn.Identity``)

    Example::

        >>> model = syncnorm.convert_sync_batchnorm(timm.create_model("efficientnet_b0"))
        >>> type(model.bn1).__name__
        'SyncBatchNormAct2d'
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: comm.ProcessGroup = None,
        device=None,
        dtype=None,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group,
            device=device, dtype=dtype,
        )
        # The order BatchNormAct2d registers them in, so that module listings match.
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__} expected 4D input (got {input.dim()}D input)")
        return self.act(self.drop(super().forward(input)))


_register_default(BatchNormAct2d, SyncBatchNormAct2d)
_register_default(SyncBatchNormAct, SyncBatchNormAct2d, revert_to=BatchNormAct2d)
