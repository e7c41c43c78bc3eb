"""syncnorm: an exact SyncBatchNorm for PyTorch that runs on every backend (gloo/CPU included)."""

from syncnorm import distributed, functional
from syncnorm.act import SyncBatchNormAct, convert_sync_batchnorm_act
from syncnorm.convert import convert_sync_batchnorm, register_conversion, revert_sync_batchnorm
from syncnorm.functional import SyncBatchNormFunction, sync_batch_norm
from syncnorm.join import join
from syncnorm.module import SyncBatchNorm
from syncnorm.precise import update_bn_stats

__version__ = "0.1.0"

__all__ = [
    "SyncBatchNorm", "SyncBatchNormAct", "SyncBatchNormFunction", "convert_sync_batchnorm",
    "convert_sync_batchnorm_act", "distributed", "functional", "join", "register_conversion",
    "revert_sync_batchnorm", "sync_batch_norm", "update_bn_stats",
]
