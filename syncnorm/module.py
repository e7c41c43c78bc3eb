"""``SyncBatchNorm``: the module that owns parameters, buffers and the decision whether to sync."""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm import comm
from syncnorm._identity import LayerIdentity
from syncnorm._recompute import is_recompute
from syncnorm.functional import host_reads_allowed, input_error, sync_batch_norm


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the union of every rank's batch, on any device and backend.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, mean and variance are taken per channel over dimension 0 and all spatial dimensions
    of *all ranks'* inputs together, so the result equals :class:`torch.nn.BatchNorm2d` (or 1d/3d)
    applied in one process to the concatenated global batch: outputs, input gradients, running
    statistics. Ranks may have different batch sizes, empty ones included. Unlike
    :class:`torch.nn.SyncBatchNorm` it runs on CPU tensors with the gloo backend as well as on CUDA
    with NCCL, and ``DistributedDataParallel`` accepts it on CPU.

    It syncs only in training mode with a process group of more than one rank (otherwise it is
    ``BatchNorm``): one ``all_gather`` in forward and one sum in backward, each checked for ranks that
    called another layer (docs/semantics.md). Every rank of the group must run every synced forward and
    backward. An activation checkpoint's recompute syncs again and updates neither the running
    statistics nor ``num_batches_tracked`` (docs/training_loops.md).

    Running statistics: ``running = (1 - momentum) * running + momentum * observed`` with the global
    mean and the *unbiased* global variance.

    Args:
        num_features: number of channels ``C`` of an input of size ``(N, C, *)``.
        eps: value added to the variance for numerical stability. Default: 1e-5
        momentum: weight of the new statistics in ``running_mean``/``running_var``; None for a
            cumulative moving average. Default: 0.1
        affine: learnable per-channel ``weight`` and ``bias``. Default: True
        track_running_stats: keep running statistics and use them in eval mode; if False, batch
            statistics are used in eval mode too (local to each rank). Default: True
        process_group: group whose ranks share statistics; None means the default group, which
            :func:`syncnorm.convert_sync_batchnorm` passes by default too.

    Shape:
        - Input: :math:`(N, C, *)`, at least 2 dimensions; channels_last inputs stay channels_last.
        - Output: same shape, dtype and memory format as the input.

    Its ``state_dict`` keys are BatchNorm's, so checkpoints move freely between BatchNorm,
    ``torch.nn.SyncBatchNorm`` and syncnorm models.

    Example::

        >>> import syncnorm
        >>> model = syncnorm.convert_sync_batchnorm(model)   # every BatchNorm becomes synced
        >>> ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        >>> # or a single layer, synchronized over a subgroup of ranks
        >>> group = torch.distributed.new_group([0, 1])
        >>> bn = syncnorm.SyncBatchNorm(64, process_group=group)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: comm.ProcessGroup = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = comm.resolve_group(process_group)  # a DeviceMesh (dimension) -> its group
        # Names this layer in the collectives (syncnorm._identity): construction order, then its path.
        self._identity = LayerIdentity.built(type(self).__name__, num_features)

    def _check_input_dim(self, input: Tensor) -> None:
        problem = input_error(input, self.num_features)
        if problem is not None:
            raise ValueError(f"{type(self).__name__} {problem}")

    def forward(self, input: Tensor) -> Tensor:
        # Only training syncs (eval with batch statistics stays local, as in torch.nn.SyncBatchNorm).
        synced = self.training and comm.world_size(self.process_group) > 1
        # A synced forward inside a backward pass is a checkpoint's recompute (compiled: a flag tensor).
        recomputing = synced and is_recompute(input)
        # Momentum bookkeeping as in BatchNorm (momentum=None: cumulative, factor 1 / steps).
        average_factor = 0.0 if self.momentum is None else self.momentum
        counted = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if counted and recomputing is not True:
            self.num_batches_tracked.add_(1 if recomputing is False else (~recomputing).long())
            if self.momentum is None:
                if synced and not host_reads_allowed(input):  # no host read of the step count
                    average_factor = self.num_batches_tracked.double().reciprocal()
                else:
                    average_factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None

        if not synced:
            self._check_input_dim(input)
            return self._local_forward(input, running_mean, running_var, use_batch_stats, average_factor)
        return self._synced_forward(input, running_mean, running_var, average_factor)

    def _local_forward(self, input: Tensor, running_mean, running_var, use_batch_stats: bool, average_factor) -> Tensor:
        # What a layer computes without syncing (a subclass with a fused activation overrides both).
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                            average_factor, self.eps)

    def _synced_forward(self, input: Tensor, running_mean, running_var, average_factor) -> Tensor:
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, True, average_factor,
                               self.eps, self.process_group, num_features=self.num_features,
                               identity=self.__dict__.get("_identity"))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: comm.ProcessGroup = None) -> nn.Module:
        """torch's idiom, ``SyncBatchNorm.convert_sync_batchnorm(model)``: the same as
        :func:`syncnorm.convert_sync_batchnorm`."""
        from syncnorm.convert import convert_sync_batchnorm  # convert imports this module

        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.process_group is None else f"{text}, process_group={self.process_group}"
