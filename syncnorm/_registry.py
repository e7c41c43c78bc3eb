"""The registry of how each BatchNorm flavour converts to its synced form and back
(``register_conversion``), read by the model walkers in ``convert.py``."""

import sys
from typing import Dict, NamedTuple, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.module import SyncBatchNorm

_REGISTER_HELP = "docs/integrations.md, 'Registering your own BatchNorm flavour'"


class BatchNormNd(_BatchNorm):
    """Plain (local) batch norm that accepts 2D to 5D input: what ``revert_sync_batchnorm`` builds for
    a SyncBatchNorm whose original BatchNorm class is unknown."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")


class _Conversion(NamedTuple):
    synced: Type[SyncBatchNorm]  # the class convert_sync_batchnorm builds
    revert_to: Optional[Type[_BatchNorm]]  # the class revert_sync_batchnorm builds; None: the layer's own


# Keyed by the class whose forward a layer must have (its own or inherited) to convert this way: a
# subclass that changes forward computes something else, and syncing it as plain BatchNorm would
# silently change the model.
_CONVERSIONS: Dict[type, _Conversion] = {
    # BatchNorm1d/2d/3d and every subclass that keeps BatchNorm's forward (mmcv's _BatchNormXd too)
    _BatchNorm: _Conversion(SyncBatchNorm, None),
    # torch's SyncBN syncs only on CUDA: the way back is a local BatchNorm for any input rank
    nn.SyncBatchNorm: _Conversion(SyncBatchNorm, BatchNormNd),
}

# Integrations that register their library's layers, imported once that library is: a model can only
# hold timm's layers after `import timm`, so the user never imports anything for them.
_INTEGRATIONS = {"timm": "syncnorm.integrations.timm"}


def register_conversion(
    source: Type[_BatchNorm],
    synced: Type[SyncBatchNorm] = SyncBatchNorm,
    revert_to: Optional[Type[_BatchNorm]] = None,
) -> None:
    """Tell :func:`convert_sync_batchnorm` and :func:`revert_sync_batchnorm` how a BatchNorm flavour
    converts and reverts.

    ``convert_sync_batchnorm`` replaces each layer of class ``source`` (and of any subclass that does
    not override ``forward``) by a ``synced`` layer built with the layer's ``num_features``, ``eps``,
    ``momentum``, ``affine`` and ``track_running_stats`` and the call's ``process_group``. The new layer
    takes over the very parameter, buffer and child-module objects of the old one, its hooks, its
    train/eval mode and every other attribute it does not have itself (a subclass's own settings,
    ``qconfig``), so a ``synced`` class can use what ``source`` keeps (timm's integration reads ``act``
    and ``drop``).
    ``revert_sync_batchnorm`` builds ``revert_to`` (default: the layer's original class) the way
    ``copy`` and ``pickle`` rebuild a module, without calling its ``__init__``, from the synced layer's
    state minus the synced class's own attributes (``process_group``...). With ``revert_to`` set, it
    also reverts layers of class ``source`` that never went through ``convert_sync_batchnorm`` (as it
    does for ``torch.nn.SyncBatchNorm``).

    Register a class only when ``synced`` computes what ``source`` computes with statistics over the
    global batch. Plain BatchNorm subclasses need no registration; timm's layers are registered
    automatically. A later registration of the same ``source`` replaces the earlier one.

    Args:
        source: a :class:`torch.nn.modules.batchnorm._BatchNorm` subclass (not a syncnorm one).
        synced: a :class:`syncnorm.SyncBatchNorm` subclass that takes ``SyncBatchNorm``'s constructor
            arguments. Default: :class:`syncnorm.SyncBatchNorm`
        revert_to: the plain class a converted layer goes back to. Default: None (its original class)

    Example::

        >>> from detectron2.layers import NaiveSyncBatchNorm
        >>> syncnorm.register_conversion(NaiveSyncBatchNorm, revert_to=torch.nn.BatchNorm2d)
        >>> model = syncnorm.convert_sync_batchnorm(model)   # NaiveSyncBatchNorm -> SyncBatchNorm
    """
    _check_class("source", source, _BatchNorm, "a torch.nn.modules.batchnorm._BatchNorm subclass")
    if issubclass(source, SyncBatchNorm):
        raise TypeError(
            f"register_conversion expected a source class that is not syncnorm's (got {source.__qualname__}, "
            f"a syncnorm.SyncBatchNorm subclass): syncnorm's layers are already synced"
        )
    _check_class("synced", synced, SyncBatchNorm, "a syncnorm.SyncBatchNorm subclass")
    if revert_to is not None:
        _check_class("revert_to", revert_to, _BatchNorm, "a torch.nn.modules.batchnorm._BatchNorm subclass")
        if issubclass(revert_to, SyncBatchNorm):
            raise TypeError(
                f"register_conversion expected a plain revert_to class (got {revert_to.__qualname__}, a "
                f"syncnorm.SyncBatchNorm subclass)"
            )
    _CONVERSIONS[source] = _Conversion(synced, revert_to)


def _register_default(
    source: Type[_BatchNorm], synced: Type[SyncBatchNorm], revert_to: Optional[Type[_BatchNorm]] = None
) -> None:
    """An integration's registration: one the user made for ``source`` first stays."""
    if source not in _CONVERSIONS:
        register_conversion(source, synced, revert_to)


def _check_class(name: str, value, base: type, expected: str) -> None:
    if not (isinstance(value, type) and issubclass(value, base)):
        got = value.__qualname__ if isinstance(value, type) else repr(value)
        raise TypeError(f"register_conversion expected {name} to be {expected} (got {got})")


def _load_integrations() -> None:
    for library, integration in _INTEGRATIONS.items():
        if library in sys.modules and integration not in sys.modules:
            try:
                __import__(integration)
            except ImportError:
                # A library version the integration does not know: its layers stay unregistered, and
                # the walkers refuse them (own forward) instead of changing them silently.
                pass


def _conversion_for(layer_type: type) -> Tuple[type, _Conversion]:
    """The nearest registered class in ``layer_type``'s MRO and its conversion."""
    for base in layer_type.__mro__:
        if base in _CONVERSIONS:
            return base, _CONVERSIONS[base]
    raise AssertionError(f"{layer_type} is not a _BatchNorm")
