"""Model walkers: ``convert_sync_batchnorm`` (BatchNorm -> syncnorm) and ``revert_sync_batchnorm``, and the
registry of how each BatchNorm flavour converts and reverts (``register_conversion``)."""

import copy
import functools
import sys
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from syncnorm import comm
from syncnorm._identity import FUNCTIONAL, LayerIdentity, unnumbered
from syncnorm.functional import HEAD
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


def register_conversion(source: Type[_BatchNorm], synced: Type[SyncBatchNorm] = SyncBatchNorm,
                        revert_to: Optional[Type[_BatchNorm]] = None) -> None:
    """Tell :func:`convert_sync_batchnorm` and :func:`revert_sync_batchnorm` how a BatchNorm flavour
    converts and reverts.

    ``convert_sync_batchnorm`` replaces each layer of class ``source`` (or of a subclass that does not
    override ``forward``) by a ``synced`` layer built with the layer's ``num_features``, ``eps``,
    ``momentum``, ``affine``, ``track_running_stats`` and the call's ``process_group``; it takes over the
    old layer's parameters, buffers, children, hooks, mode and every attribute it lacks (timm's
    integration reads ``act`` and ``drop``). ``revert_sync_batchnorm`` rebuilds ``revert_to`` (default:
    the original class) from that state without calling its ``__init__``, as ``copy`` does; with
    ``revert_to`` set it also reverts ``source`` layers that were never converted.

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
        raise TypeError(f"register_conversion expected a source class that is not syncnorm's (got "
                        f"{source.__qualname__}, a syncnorm.SyncBatchNorm subclass): syncnorm's layers are "
                        "already synced")
    _check_class("synced", synced, SyncBatchNorm, "a syncnorm.SyncBatchNorm subclass")
    if revert_to is not None:
        _check_class("revert_to", revert_to, _BatchNorm, "a torch.nn.modules.batchnorm._BatchNorm subclass")
        if issubclass(revert_to, SyncBatchNorm):
            raise TypeError(f"register_conversion expected a plain revert_to class (got {revert_to.__qualname__}, a "
                            "syncnorm.SyncBatchNorm subclass)")
    _CONVERSIONS[source] = _Conversion(synced, revert_to)


def _register_default(source: Type[_BatchNorm], synced: Type[SyncBatchNorm],
                      revert_to: Optional[Type[_BatchNorm]] = None) -> None:
    """An integration's registration: one the user made for ``source`` first stays."""
    if source not in _CONVERSIONS:
        register_conversion(source, synced, revert_to)


def _check_class(name: str, value, base: type, expected: str) -> None:
    if not (isinstance(value, type) and issubclass(value, base)):
        got = value.__qualname__ if isinstance(value, type) else repr(value)
        raise TypeError(f"register_conversion expected {name} to be {expected} (got {got})")


def _load_integrations() -> None:
    """Register timm's layers once timm is imported (a model can hold them only then): nothing for the
    user to import. A timm version the integration does not know leaves them unregistered, and the
    walkers refuse them (own forward) instead of changing them silently."""
    if "timm" in sys.modules and "syncnorm.integrations.timm" not in sys.modules:
        try:
            import syncnorm.integrations.timm  # noqa: F401
        except ImportError:
            pass


def _conversion_for(layer_type: type) -> Tuple[type, _Conversion]:
    """The nearest registered class in ``layer_type``'s MRO (a _BatchNorm subclass's) and its conversion."""
    return next((base, _CONVERSIONS[base]) for base in layer_type.__mro__ if base in _CONVERSIONS)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_forward_problem(layer: nn.Module, base: type) -> Optional[str]:
    if type(layer).forward is base.forward:
        return None
    return (
        f"got {_name(type(layer))}, which has its own forward instead of {base.__qualname__.lstrip('_')}'s, "
        f"at {{where}}{{more}}): register how it syncs with syncnorm.register_conversion ({_REGISTER_HELP})"
    )


def _convert_problem(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` cannot convert, as the rest of an error message; None when it can (or is no BatchNorm)."""
    if not isinstance(layer, _BatchNorm) or isinstance(layer, SyncBatchNorm):
        return None
    if isinstance(layer, LazyModuleMixin):
        # Materialized lazy layers are plain BatchNorm*d (torch swaps the class at the first forward).
        return (
            f"got an uninitialized {type(layer).__qualname__} at {{where}}{{more}}): run one forward pass "
            f"on the model first (it fixes num_features), then convert"
        )
    if parametrize.is_parametrized(layer):
        return (
            f"got {type(layer).__qualname__} with parametrizations at {{where}}{{more}}): convert before "
            f"parametrizing, or remove them first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    base, _ = _conversion_for(type(layer))
    return _own_forward_problem(layer, base)


def _revert_class(layer: nn.Module) -> Tuple[Optional[type], Optional[str]]:
    """What ``layer`` reverts to (None: it stays), or why that is unknown."""
    if isinstance(layer, SyncBatchNorm):
        original = layer.__dict__.get("_original_class")
        if original is not None:
            return original, None
        if type(layer).forward is SyncBatchNorm.forward:
            return BatchNormNd, None
        # Built directly rather than converted: the class it is registered as the synced form of.
        for source, conversion in _CONVERSIONS.items():
            if conversion.synced is type(layer):
                return conversion.revert_to or source, None
        return None, (
            f"got {_name(type(layer))}, a SyncBatchNorm subclass with its own forward that no registered "
            f"conversion builds, at {{where}}{{more}}): register the class it reverts to with "
            f"syncnorm.register_conversion ({_REGISTER_HELP})"
        )
    if isinstance(layer, _BatchNorm):
        base, conversion = _conversion_for(type(layer))
        if conversion.revert_to is None:
            return None, None
        return conversion.revert_to, _own_forward_problem(layer, base)
    return None, None


def _check_all(module: nn.Module, caller: str, expected: str, problem_of: Callable) -> None:
    """Raise one error for every layer ``problem_of`` objects to, before anything is replaced."""
    problems = [(path, problem_of(layer)) for path, layer in module.named_modules()]
    problems = [(path, problem) for path, problem in problems if problem is not None]
    if not problems:
        return
    path, problem = problems[0]
    where = f"'{path}'" if path else "the root"
    others = [f"'{other}'" for other, _ in problems[1:]]
    more = ""
    if others:
        more = f"; {len(others)} more: {', '.join(others[:3])}" + (", ..." if len(others) > 3 else "")
    raise ValueError(
        f"{caller} expected {expected} ({problem.format(where=where, more=more)}; nothing was changed"
    )


# Module attributes that hold hooks (names vary across torch releases).
_HOOK_ATTRIBUTES = frozenset(name for name in vars(nn.Module()) if "hook" in name)
# A forward compiled with Module.compile() is bound to the old module (torch's pickling drops it too).
_NOT_CARRIED = frozenset({"_compiled_call_impl"})


def _carry(source: _BatchNorm, target: SyncBatchNorm) -> SyncBatchNorm:
    """Move ``source``'s state into the freshly built ``target``: the very parameter, buffer and child
    objects (so optimizers and DDP reducers that hold them keep working), the hook dictionaries (handles
    keep working), the mode, and every attribute ``target`` lacks (so that revert can rebuild the original)."""
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
    target._modules.update(source._modules)
    target.training = source.training  # not .train(): child modules keep their own mode
    own = vars(target)
    for name, value in vars(source).items():
        if name in _HOOK_ATTRIBUTES or (name not in own and name not in _NOT_CARRIED):
            own[name] = value
    return target


@functools.lru_cache(maxsize=None)
def _synced_only_attributes(synced_class: type) -> frozenset:
    """Instance attributes a fresh ``synced_class`` layer has and a plain BatchNorm lacks."""
    plain = vars(BatchNormNd(1, device="meta"))
    with unnumbered():  # a throwaway: it must not shift the construction numbers of real layers
        synced = vars(synced_class(1, device="meta"))
    return frozenset(synced) - frozenset(plain) | {"_original_class"}


def _rebuild(layer: _BatchNorm, plain_class: type) -> _BatchNorm:
    """A ``plain_class`` layer that takes over ``layer``'s state except what only synced layers have,
    built as ``copy.copy`` builds a module: without ``__init__``, whose arguments are not known."""
    synced_class = type(layer) if isinstance(layer, SyncBatchNorm) else nn.SyncBatchNorm
    dropped = _synced_only_attributes(synced_class) | _NOT_CARRIED
    plain = plain_class.__new__(plain_class)
    plain.__dict__.update((name, value) for name, value in vars(layer).items() if name not in dropped)
    return plain


def _replace_modules(module: nn.Module, make, memo: Dict[int, nn.Module]) -> nn.Module:
    """Rebuild ``module``'s tree, replacing each layer for which ``make`` returns a new one; a layer
    shared by several parents is replaced once and stays shared."""
    if id(module) in memo:
        return memo[id(module)]
    replacement = make(module)
    if replacement is None:
        replacement = module
        for name, child in list(module.named_children()):
            new_child = _replace_modules(child, make, memo)
            if new_child is not child:
                setattr(module, name, new_child)
    memo[id(module)] = replacement
    return replacement


def convert_sync_batchnorm(module: nn.Module, process_group: comm.ProcessGroup = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by its synced form and return the converted module.

    A converted layer computes what the original computed, except that its batch statistics span all
    ranks of ``process_group``:

    - ``BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and their subclasses that do not override
      ``forward`` become :class:`syncnorm.SyncBatchNorm`;
    - timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` become
      :class:`syncnorm.integrations.timm.SyncBatchNormAct2d` (loaded once timm is imported);
    - classes registered with :func:`syncnorm.register_conversion` become their registered form;
    - frozen layers (``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``) and syncnorm's own layers
      stay as they are.

    ``ValueError`` (naming the class and its path; nothing is changed) for any other BatchNorm subclass
    with its own ``forward``, an uninitialized lazy BatchNorm, and parametrized BatchNorm layers.

    The walk goes through any container, ``DistributedDataParallel`` included. Converted layers take
    over the original parameter, buffer and child-module objects and hooks, so ``requires_grad``,
    device, dtype, train/eval mode, ``state_dict`` and optimizers built before are unchanged. Children
    are replaced in place; use the return value, which differs from ``module`` only when the root is a
    BatchNorm. Convert before wrapping the model in ``DistributedDataParallel``.

    Args:
        module: the model (or a single layer).
        process_group: group whose ranks share statistics in every converted layer; None means the
            default (world) group.

    Example::

        >>> model = syncnorm.convert_sync_batchnorm(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    _load_integrations()
    _check_all(module, "convert_sync_batchnorm", "BatchNorm layers it can sync exactly", _convert_problem)

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if not isinstance(layer, _BatchNorm) or isinstance(layer, SyncBatchNorm):
            return None
        _, conversion = _conversion_for(type(layer))
        with unnumbered():  # named below: takes no construction number (that would shift other layers')
            synced = conversion.synced(
                layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                process_group=process_group, device="meta",
            )
        _carry(layer, synced)
        synced._original_class = conversion.revert_to or type(layer)  # what revert gives back
        return synced

    root = module
    module = _replace_modules(module, make, {})
    # Synced layers below the root are named by path, the same on every rank (syncnorm/_identity.py); a shared
    # layer by its smallest (named last here), whatever order its parents registered it in.
    for path, layer in sorted(module.named_modules(remove_duplicate=False), key=lambda item: item[0], reverse=True):
        if path and isinstance(layer, SyncBatchNorm):
            layer._identity = LayerIdentity.named(path)
    if module is not root:  # a converted BatchNorm root has no path: a construction number, as if built
        module._identity = LayerIdentity.built(type(module).__name__, module.num_features)
    # A graph compiled before any eager step cannot ask for the packet width: it pads to the widest layer.
    synced = [layer for layer in module.modules() if isinstance(layer, SyncBatchNorm)]
    widest: Dict[int, int] = {}
    for layer in synced:
        widest[id(layer.process_group)] = max(widest.get(id(layer.process_group), 0), layer.num_features)
    for layer in synced:
        if layer.__dict__.get("_identity", FUNCTIONAL) is not FUNCTIONAL:  # not the shared functional identity
            layer._identity.width = HEAD + 2 * widest[id(layer.process_group)]
    return module


def revert_sync_batchnorm(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``module`` with every :class:`syncnorm.SyncBatchNorm` (and ``torch.nn.SyncBatchNorm``)
    replaced by a plain, local BatchNorm, for inference, export or single-process use.

    A layer made by :func:`convert_sync_batchnorm` gets its original class back (a subclass, timm's
    ``BatchNormAct2d`` with its very ``act`` and ``drop``); one converted from ``torch.nn.SyncBatchNorm``,
    and any other, becomes :class:`syncnorm.convert.BatchNormNd` (2D to 5D input); a registered
    ``revert_to`` wins. Parameter and buffer values, ``requires_grad``, train/eval mode and
    ``state_dict`` keys are kept. ``ValueError`` (nothing is changed) for a synced subclass with its own
    ``forward`` whose plain form is unknown.

    - ``inplace=False`` (default): the result is a ``copy.deepcopy`` (gradients left behind, process
      groups shared), so ``module`` keeps syncing and training (export every epoch from a model in training).
      Pass the model, not its ``DistributedDataParallel`` wrapper (``ddp_model.module``).
    - ``inplace=True``: children are replaced in ``module`` itself, and each reverted layer holds the
      very parameter and buffer objects of the layer it replaces, so an optimizer built on ``module``
      keeps working (what a Lightning ``LayerSync`` plugin needs at teardown). The return value differs
      from ``module`` only when the root is a SyncBatchNorm.

    Args:
        module: the model (or a single layer).
        inplace: revert ``module`` itself instead of a copy. Default: False

    Example::

        >>> model = syncnorm.revert_sync_batchnorm(ddp_model.module).eval()   # a copy
        >>> torch.onnx.export(model, (example,), "model.onnx")
    """
    _load_integrations()
    _check_all(
        module, "revert_sync_batchnorm", "synced layers whose plain form it knows",
        lambda layer: _revert_class(layer)[1],
    )
    if not inplace:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "revert_sync_batchnorm(inplace=False) expected the model (got its DistributedDataParallel "
                "wrapper): pass ddp_model.module, or inplace=True to revert the wrapped model itself"
            )
        # Process groups cannot be copied, and the reverted layers drop them anyway: share them.
        memo = {
            id(layer.process_group): layer.process_group
            for layer in module.modules()
            if isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm)) and layer.process_group is not None
        }
        try:
            module = copy.deepcopy(module, memo)
        except (TypeError, RuntimeError) as error:
            raise TypeError(
                f"revert_sync_batchnorm(inplace=False) copies the model, and this one cannot be "
                f"deep-copied ({error}); pass inplace=True to revert it in place"
            ) from error

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if "_syncnorm_original" in vars(layer):  # a slot syncnorm.act's fusion emptied: its module back
            return layer._syncnorm_original
        plain_class, _ = _revert_class(layer)
        return None if plain_class is None else _rebuild(layer, plain_class)

    return _replace_modules(module, make, {})
