"""Models: LeNet with normalization (d2l's BatchNorm chapter) and a CIFAR-stem ResNet-18.

Both are built with the registry's layers (plain ``nn.BatchNorm*`` for ``bn`` and ``syncbn``); for
``syncbn`` the finished model goes through one :func:`syncnorm.convert_sync_batchnorm` call.
"""

from functools import partial
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import syncnorm
from syncnorm.train.inits import init_weights
from syncnorm.train.norms import NORMS, make_norm

MODEL_NAMES = ("lenet", "resnet18")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
ACTIVATION_NAMES = tuple(ACTIVATIONS)


class LeNet(nn.Sequential):
    """conv6-5x5 -> norm -> act -> avgpool -> conv16-5x5 -> norm -> act -> avgpool
    -> fc120 -> norm -> act -> fc84 -> norm -> act -> fc10.

    On 1x28x28 input the flattened size is 16*4*4 = 256 (d2l's layout, no padding); other input sizes
    get the matching fc120 input size.
    """

    def __init__(self, norm: str = "bn", act: str = "relu", in_shape: Sequence[int] = (1, 28, 28),
                 num_classes: int = 10) -> None:
        channels, height, width = in_shape
        activation = ACTIVATIONS[act]
        side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731  two (conv5 valid, pool2) stages
        flat = 16 * side(height) * side(width)
        if flat <= 0:
            raise ValueError(f"LeNet expected inputs of at least 16x16 pixels (got {height}x{width})")
        super().__init__(
            nn.Conv2d(channels, 6, kernel_size=5), make_norm(norm, 6, dim=2), activation(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), make_norm(norm, 16, dim=2), activation(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(flat, 120), make_norm(norm, 120, dim=1), activation(),
            nn.Linear(120, 84), make_norm(norm, 84, dim=1), activation(),
            nn.Linear(84, num_classes),
        )

    # model.checkpoint_activations: the stages recomputed in backward (conv-norm-act-pool twice,
    # flatten-fc-norm-act, fc-norm-act), as index ranges into the layers; the last fc runs as usual.
    STAGES = ((0, 4), (4, 8), (8, 12), (12, 15))
    checkpoint_activations = False

    def forward(self, input):
        if not (self.checkpoint_activations and torch.is_grad_enabled()):
            return super().forward(input)
        layers = list(self)
        for start, stop in self.STAGES:
            input = checkpoint(_run_layers, layers[start:stop], input, use_reentrant=False)
        return _run_layers(layers[self.STAGES[-1][1]:], input)


def _run_layers(layers, input):
    for layer in layers:
        input = layer(input)
    return input


class CheckpointedSequential(nn.Sequential):
    """``nn.Sequential`` whose children's activations are recomputed in backward (non-reentrant
    ``torch.utils.checkpoint``, one child at a time) while gradients are on; the same children and
    ``state_dict`` keys as the ``nn.Sequential`` it replaces."""

    def forward(self, input):
        for block in self:
            input = checkpoint(block, input, use_reentrant=False) if torch.is_grad_enabled() else block(input)
        return input


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """``model.checkpoint_activations``: recompute the activations of ``model``'s blocks (LeNet's stages,
    ResNet's residual blocks) in backward instead of keeping them. Parameters, buffers and ``state_dict``
    keys stay as they are; synced layers count each step once (docs/training_loops.md)."""
    if isinstance(model, LeNet):
        model.checkpoint_activations = True
        return model
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(model, name, CheckpointedSequential(*getattr(model, name)))
    return model


def resnet18_cifar(norm: str = "bn", in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 with the usual small-image stem: 3x3 stride-1 conv1 and no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes, norm_layer=partial(make_norm, norm, dim=2))
    model.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, *, norm: str = "syncbn", init: str = "default", act: str = "relu",
                in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                checkpoint_activations: bool = False) -> nn.Module:
    """Build model ``name``, initialize it with scheme ``init``, and for ``norm='syncbn'`` convert every
    BatchNorm into :class:`syncnorm.SyncBatchNorm` (one walker call). Seed torch first."""
    if norm not in NORMS:
        raise ValueError(f"expected a norm name, one of {', '.join(NORMS)} (got {norm!r})")
    if name == "lenet":
        model = LeNet(norm, act, in_shape, num_classes)
    elif name == "resnet18":
        model = resnet18_cifar(norm, in_shape, num_classes)
    else:
        raise ValueError(f"expected a model name, one of {', '.join(MODEL_NAMES)} (got {name!r})")
    init_weights(model, init)
    if NORMS[norm].convert:
        model = syncnorm.convert_sync_batchnorm(model)
    if checkpoint_activations:
        model = checkpoint_blocks(model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_sync_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, syncnorm.SyncBatchNorm) for m in model.modules())


def to_plain(model: nn.Module) -> nn.Module:
    """The same model with every SyncBatchNorm reverted to plain BatchNorm (for eval and export)."""
    return syncnorm.revert_sync_batchnorm(model)


__all__ = ["ACTIVATION_NAMES", "CheckpointedSequential", "LeNet", "MODEL_NAMES", "build_model", "checkpoint_blocks",
           "count_parameters", "has_sync_batchnorm", "resnet18_cifar", "to_plain"]
