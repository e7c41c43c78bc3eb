"""syncnorm in Lightning (the ``lightning`` package): one plugin instead of ``sync_batchnorm=True``.

``Trainer(sync_batchnorm=True)`` converts to ``torch.nn.SyncBatchNorm``, which fails on CPU (DDP
refuses it: "SyncBatchNorm layers only work with GPU modules"). This plugin converts to
:class:`syncnorm.SyncBatchNorm` instead, which runs on every device and backend::

    >>> from syncnorm.integrations.lightning import SyncNormLayerSync
    >>> trainer = lightning.pytorch.Trainer(accelerator="cpu", devices=2, strategy="ddp",
    ...                                     plugins=[SyncNormLayerSync()])

Lightning's DDP and FSDP strategies call ``apply`` when ``fit`` sets up and ``revert`` at its
teardown, so after ``fit`` the LightningModule has plain BatchNorm layers again (as with
``sync_batchnorm=True``). Do not also pass ``sync_batchnorm=True``: Lightning refuses both at once.
For ``import pytorch_lightning`` use :mod:`syncnorm.integrations.pytorch_lightning`.
"""

from syncnorm.integrations._layer_sync import SyncNormLayerSyncMethods, missing

try:
    from lightning.pytorch.plugins import LayerSync
except ImportError as error:
    raise missing("lightning", "lightning", error) from error


class SyncNormLayerSync(SyncNormLayerSyncMethods, LayerSync):
    """Lightning ``LayerSync`` plugin: BatchNorm -> :class:`syncnorm.SyncBatchNorm` for training, and back.

    Example::

        >>> trainer = Trainer(strategy="ddp", plugins=[SyncNormLayerSync()])
    """


__all__ = ["SyncNormLayerSync"]
