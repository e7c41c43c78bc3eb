"""The two methods of a Lightning ``LayerSync`` plugin, shared by both Lightning package names."""

from torch import nn

from syncnorm.convert import convert_sync_batchnorm, revert_sync_batchnorm


class SyncNormLayerSyncMethods:
    """``apply``/``revert`` for Lightning's DDP and FSDP strategies (``setup`` and ``teardown``)."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace every BatchNorm (and ``torch.nn.SyncBatchNorm``) by :class:`syncnorm.SyncBatchNorm`,
        synced over the default (world) group."""
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Give ``model`` its plain BatchNorm layers back, in place (Lightning keeps using ``model``)."""
        return revert_sync_batchnorm(model, inplace=True)


def missing(module: str, distribution: str, error: ImportError) -> ImportError:
    """A one-line ImportError that says which package is missing and how to install it."""
    return ImportError(
        f"syncnorm.integrations.{module} needs the {distribution!r} package (import failed: {error}); "
        f"install it: pip install {distribution} (or syncnorm's 'lightning' extra: pip install -e '.[lightning]')"
    )
