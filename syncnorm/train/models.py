"""Models: LeNet with normalization (d2l's BatchNorm chapter), a CIFAR-stem ResNet-18, and any
torchvision classification model or timm model by name.

LeNet and ``resnet18`` are built with the registry's layers (plain ``nn.BatchNorm*`` for ``bn`` and
``syncbn``); a named torchvision or timm model keeps its own BatchNorm layers. For ``syncbn`` the
finished model goes through one :func:`syncnorm.convert_sync_batchnorm` call (timm's ``BatchNormAct2d``
included, see :mod:`syncnorm.integrations.timm`), with ``process_group`` when the sync is per group.

Names (``model.name``): ``lenet``; ``resnet18``, the launcher's CIFAR-stem ResNet-18 (as before);
``torchvision:NAME`` or a bare ``NAME`` for any torchvision classification model (``resnet50``,
``mobilenet_v3_small``, ``convnext_tiny``, ...; torchvision's own ``resnet18`` is
``torchvision:resnet18``); ``timm:NAME`` for a timm model (``pip install -e '.[timm]'``). Nothing is
downloaded: models are built with random weights and ``num_classes`` from the data;
:func:`load_weights` loads a local ``state_dict``.
"""

import difflib
import functools
import os
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import syncnorm
from syncnorm.train.inits import init_weights
from syncnorm.train.norms import NORMS, make_norm

MODEL_NAMES = ("lenet", "resnet18")
TORCHVISION_PREFIX, TIMM_PREFIX = "torchvision:", "timm:"
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}
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
    stages = ("layer1", "layer2", "layer3", "layer4")
    if not all(isinstance(getattr(model, name, None), nn.Sequential) for name in stages):
        raise ValueError(f"model.checkpoint_activations: expected lenet, resnet18 or a torchvision ResNet "
                         f"(layer1 ... layer4) (got a {type(model).__name__}); set it to false for this model")
    for name in stages:
        setattr(model, name, CheckpointedSequential(*getattr(model, name)))
    return model


def resnet18_cifar(norm: str = "bn", in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 with the usual small-image stem: 3x3 stride-1 conv1 and no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes, norm_layer=partial(make_norm, norm, dim=2))
    model.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@functools.lru_cache(maxsize=None)
def torchvision_names() -> Tuple[str, ...]:
    """torchvision's classification model names (``torchvision.models.list_models``)."""
    from torchvision import models

    return tuple(models.list_models(module=models))


@functools.lru_cache(maxsize=None)
def timm_names() -> Optional[Tuple[str, ...]]:
    """timm's model names, None when timm is not installed."""
    try:
        import timm
    except ImportError:
        return None
    return tuple(timm.list_models())


def _did_you_mean(name: str, names: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def model_name_problem(name: str) -> Optional[str]:
    """What is wrong with ``model.name`` value ``name`` (an ``expected ... (got ...)`` line), or None."""
    if name in MODEL_NAMES:
        return None
    if name.startswith(TIMM_PREFIX):
        names = timm_names()
        if names is None:
            return (f"expected timm installed for {name!r} (got no module named 'timm'); pip install "
                    f"'timm>=0.9' (syncnorm's extra: pip install -e '.[timm]'), or use a torchvision model")
        bare = name[len(TIMM_PREFIX):]
        if bare in names:
            return None
        return f"expected a timm model name after timm: (got {bare!r}){_did_you_mean(bare, names, TIMM_PREFIX)}"
    bare = name[len(TORCHVISION_PREFIX):] if name.startswith(TORCHVISION_PREFIX) else name
    if bare in torchvision_names():
        return None
    if timm_names() and bare in timm_names():
        hint = f"; did you mean timm:{bare}?"
    else:
        hint = _did_you_mean(bare, tuple(dict.fromkeys(MODEL_NAMES + torchvision_names())))
    if not hint and timm_names():
        hint = _did_you_mean(bare, timm_names(), TIMM_PREFIX)
    return (f"expected {', '.join(MODEL_NAMES)}, a torchvision classification model name (e.g. resnet50, "
            f"mobilenet_v3_small, convnext_tiny) or timm:NAME (got {name!r}){hint}")


def named_model(name: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision's or timm's model ``name`` (``timm:``/``torchvision:`` prefix or a bare torchvision
    name), random weights, ``num_classes`` outputs. Raises ValueError for what it cannot build."""
    problem = model_name_problem(name)
    if problem:
        raise ValueError(problem)
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                 in_chans=in_shape[0])
    from torchvision import models

    if in_shape[0] != 3:
        raise ValueError(f"model.name={name}: expected 3-channel images for a torchvision model (got "
                         f"{in_shape[0]} channel(s)); use data.name=imagefolder (RGB), or lenet or timm:NAME")
    bare = name[len(TORCHVISION_PREFIX):] if name.startswith(TORCHVISION_PREFIX) else name
    return models.get_model(bare, weights=None, num_classes=num_classes)


def build_model(name: str, *, norm: str = "syncbn", init: str = "default", act: str = "relu",
                in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                checkpoint_activations: bool = False, process_group=None) -> nn.Module:
    """Build model ``name``, initialize it with scheme ``init``, and for ``norm='syncbn'`` convert every
    BatchNorm into :class:`syncnorm.SyncBatchNorm` (one walker call; over ``process_group``, None: all
    ranks). Seed torch first."""
    if norm not in NORMS:
        raise ValueError(f"expected a norm name, one of {', '.join(NORMS)} (got {norm!r})")
    if name == "lenet":
        model = LeNet(norm, act, in_shape, num_classes)
    elif name == "resnet18":
        model = resnet18_cifar(norm, in_shape, num_classes)
    else:
        if norm not in NAMED_MODEL_NORMS:
            raise ValueError(f"model.norm: expected {' or '.join(NAMED_MODEL_NORMS)} for model.name={name} (its "
                             f"norm layers are its own BatchNorms; got {norm!r}, which lenet and resnet18 take)")
        model = named_model(name, in_shape, num_classes)
    if NORMS[norm].fuse_act and (name != "lenet" or act != "leaky_relu"):
        raise ValueError(f"model.norm={norm}: expected model.name=lenet with model.act=leaky_relu (got {name} with "
                         f"{act if name == 'lenet' else 'its own activations'}); the fused layer inverts its "
                         f"activation in backward, so it takes LeakyReLU, not ReLU")
    init_weights(model, init)
    if NORMS[norm].fuse_act:
        if not hasattr(syncnorm, "convert_sync_batchnorm_act"):
            raise ValueError(f"model.norm={norm}: expected syncnorm.SyncBatchNormAct in this syncnorm (got none); "
                             f"update syncnorm, or use model.norm=syncbn")
        model = syncnorm.convert_sync_batchnorm_act(model, process_group=process_group)
    elif NORMS[norm].convert:
        model = syncnorm.convert_sync_batchnorm(model, process_group=process_group)
    if checkpoint_activations:
        model = checkpoint_blocks(model)
    return model


# model.norm values a torchvision or timm model takes: its BatchNorm layers synced or left as they are.
NAMED_MODEL_NORMS = ("syncbn", "bn")


def _state_dict_in(loaded, path: str) -> dict:
    """The ``state_dict`` in what ``torch.load`` read from ``path``: itself, or a launcher checkpoint's
    ``model`` (also ``state_dict``, as other scripts save it)."""
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in loaded.items()):
        raise ValueError(f"model.weights={path}: expected a state_dict (a mapping of names to tensors) or a "
                         f"checkpoint holding one under 'model' (got {type(loaded).__name__})")
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in loaded.items()}


def load_weights(model: nn.Module, path: str) -> List[str]:
    """``model.weights``: load the local ``state_dict`` file ``path`` into ``model`` (``weights_only``:
    no code runs). Keys must match; the last ``nn.Linear`` (the classifier) may differ in shape, as when
    the file was trained for another ``num_classes``: it keeps its fresh init. Returns those kept keys;
    raises ValueError (one line) otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"model.weights={path}: expected a state_dict file (got "
                         f"{'a directory' if os.path.isdir(path) else 'no such file'})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and "unsafe global" errors all mean: not a plain state_dict
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"model.weights={path}: expected a file torch.save wrote (a state_dict) (got: "
                         f"{detail[:200]})") from None
    state = _state_dict_in(loaded, path)
    own = model.state_dict()
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    head = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"} if linears else set()
    reshaped = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    kept = [k for k in reshaped if k in head]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k in reshaped if k not in head]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise ValueError(f"model.weights={path}: expected the keys and shapes of this model's state_dict (got "
                         f"{'; '.join(parts)}); was it saved from another model.name?")
    model.load_state_dict({k: (own[k] if k in kept else v) for k, v in state.items()})
    return kept


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_sync_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, syncnorm.SyncBatchNorm) for m in model.modules())


def to_plain(model: nn.Module) -> nn.Module:
    """The same model with every SyncBatchNorm reverted to plain BatchNorm (for eval and export)."""
    return syncnorm.revert_sync_batchnorm(model)


__all__ = ["ACTIVATION_NAMES", "CheckpointedSequential", "LeNet", "MODEL_NAMES", "build_model", "checkpoint_blocks",
           "load_weights", "model_name_problem", "named_model",
           "count_parameters", "has_sync_batchnorm", "resnet18_cifar", "to_plain"]
