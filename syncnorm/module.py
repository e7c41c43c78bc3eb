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

    Each synced training step sends one ``all_gather`` (mean, variance, count, ``num_features`` and the
    layer's identity: ``2C + 9`` floats per rank, padded to the widest layer of its group) in forward and
    one sum as wide in backward, each checked for ranks that called another layer or built another
    model (docs/semantics.md). It syncs only in training mode and only when a
    process group with more than one rank exists; otherwise it computes exactly what ``BatchNorm``
    computes locally. Every rank of the group must run every synced forward and backward.

    Under activation checkpointing (``torch.utils.checkpoint``, reentrant or not, or any recompute in
    backward) a recompute syncs again, as every rank recomputes at the same point of its backward, and
    updates neither the running statistics nor ``num_batches_tracked``: the step counts once, and a
    recompute that sees other input than its forward gives BatchNorm's result on the recomputed global
    batch (docs/training_loops.md).

    The running mean is updated with the global mean and the running variance with the *unbiased*
    global variance: ``running = (1 - momentum) * running + momentum * observed``. With
    ``momentum=None`` it is a cumulative moving average, as in BatchNorm.

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
        - Input: :math:`(N, C, *)` with at least 2 dimensions (1d: ``(N, C)``/``(N, C, L)``,
          2d: ``(N, C, H, W)``, 3d: ``(N, C, D, H, W)``); channels_last inputs stay channels_last.
        - Output: same shape, dtype and memory format as the input.

    Its ``state_dict`` keys are BatchNorm's (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so checkpoints move freely between BatchNorm, ``torch.nn.SyncBatchNorm``
    and syncnorm models.

    Example::

        >>> import syncnorm
        >>> model = syncnorm.convert_sync_batchnorm(model)   # every BatchNorm becomes synced
        >>> ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        >>> # or a single layer, synchronized over a subgroup of ranks
        >>> group = torch.distributed.new_group([0, 1])
        >>> bn = syncnorm.SyncBatchNorm(64, process_group=group)
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
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = comm.resolve_group(process_group)  # a DeviceMesh (dimension) -> its group
        # What names this layer in the collectives, the same on every rank: its construction order
        # here, its qualified name once convert_sync_batchnorm walks the model (syncnorm._identity).
        self._identity = LayerIdentity.built(type(self).__name__, num_features)

    def _check_input_dim(self, input: Tensor) -> None:
        problem = input_error(input, self.num_features)
        if problem is not None:
            raise ValueError(f"{type(self).__name__} {problem}")

    def forward(self, input: Tensor) -> Tensor:
        # Only training syncs; eval with batch statistics (track_running_stats=False) stays local,
        # as in torch.nn.SyncBatchNorm.
        synced = self.training and comm.world_size(self.process_group) > 1
        # A synced forward that runs inside a backward pass is an activation checkpoint's recompute: the
        # step is counted once (in a compiled graph a flag tensor, decided when the graph runs).
        recomputing = synced and is_recompute(input)
        # Momentum bookkeeping as in BatchNorm: num_batches_tracked counts training steps, and with
        # momentum=None the running averages are cumulative (factor 1 / steps).
        average_factor = 0.0 if self.momentum is None else self.momentum
        counted = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if counted and recomputing is not True:
            self.num_batches_tracked.add_(1 if recomputing is False else (~recomputing).long())
            if self.momentum is None:
                if synced and not host_reads_allowed(input):
                    # Stays a device tensor: reading the step count would be a host sync.
                    average_factor = self.num_batches_tracked.double().reciprocal()
                else:
                    average_factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are updated only when they are tracked and we are training.
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None

        if not synced:
            self._check_input_dim(input)
            return self._local_forward(input, running_mean, running_var, use_batch_stats, average_factor)
        return self._synced_forward(input, running_mean, running_var, average_factor)

    def _local_forward(self, input: Tensor, running_mean, running_var, use_batch_stats: bool, average_factor) -> Tensor:
        # What a layer computes without syncing (a subclass with a fused activation overrides both).
        return F.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, average_factor, self.eps
        )

    def _synced_forward(self, input: Tensor, running_mean, running_var, average_factor) -> Tensor:
        return sync_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, True, average_factor,
            self.eps, self.process_group, num_features=self.num_features,
            identity=self.__dict__.get("_identity"),
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: comm.ProcessGroup = None) -> nn.Module:
        """torch's idiom, ``SyncBatchNorm.convert_sync_batchnorm(model)``: the same as
        :func:`syncnorm.convert_sync_batchnorm`."""
        from syncnorm.convert import convert_sync_batchnorm  # convert imports this module

        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.process_group is None else f"{text}, process_group={self.process_group}"
