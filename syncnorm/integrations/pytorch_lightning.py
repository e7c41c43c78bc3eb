"""syncnorm in Lightning imported as ``pytorch_lightning``: see :mod:`syncnorm.integrations.lightning`.

The ``lightning`` and ``pytorch_lightning`` packages have separate plugin classes, and a Trainer
accepts only plugins from its own package: use this module with ``pytorch_lightning.Trainer``.
"""

from syncnorm.integrations._layer_sync import SyncNormLayerSyncMethods, missing

try:
    from pytorch_lightning.plugins import LayerSync
except ImportError as error:
    raise missing("pytorch_lightning", "pytorch-lightning", error) from error


class SyncNormLayerSync(SyncNormLayerSyncMethods, LayerSync):
    """``pytorch_lightning`` ``LayerSync`` plugin: BatchNorm -> :class:`syncnorm.SyncBatchNorm`, and back.

    Example::

        >>> trainer = pytorch_lightning.Trainer(strategy="ddp", plugins=[SyncNormLayerSync()])
    """


__all__ = ["SyncNormLayerSync"]
