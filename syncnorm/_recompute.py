"""Activation-checkpoint bookkeeping: is a synced call a recompute, and of which original forward.

``torch.utils.checkpoint`` reruns a region's forward in backward. A synced layer must not sync again
then (the other ranks are in their backward) nor count the step twice: it reuses what its original
forward computed. This file decides, once per call and before the autograd Function is applied,
whether the call is such a recompute and which kept forward it repeats.

Which forward: a recompute pass reruns its region's calls in the original order, so within a region
the k-th recomputed call of a layer is the k-th kept forward of that layer in that region. The region
is the checkpoint's own per-region object (non-reentrant: its ``_CheckpointFrame``; reentrant: the
``CheckpointFunction`` node), found on the Python stack, the same object in the original forward and in
the recompute. Where no region is found, the forward is found by the bits of its local statistics,
and two kept forwards with the same bits but different global results make the call invalid.

A recompute never raises on its own rank (the other ranks would wait in their next collective):
whether it saw its original input is a flag that the layer's backward sum carries, so every rank
raises there together (``functional.py``).
"""

import collections
import sys
import weakref
from typing import List, Optional, Tuple, Union

import torch
import torch.utils.checkpoint as _checkpoint
from torch import Tensor

_CHECKPOINT_FILE = _checkpoint.__file__
_REENTRANT_CODES = tuple(
    getattr(getattr(_checkpoint, "CheckpointFunction", None), name).__code__ for name in ("forward", "backward")
    if hasattr(getattr(_checkpoint, "CheckpointFunction", None), name)
)
_STACK_LIMIT = 400  # frames walked at most looking for a checkpoint region


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    A synced layer's forward that runs then is an activation checkpoint's recompute: reentrant
    ``torch.utils.checkpoint`` reruns the checkpointed function inside its backward, and the
    non-reentrant one inside the unpacking of a saved tensor, both in the engine.
    """
    return torch._C._current_graph_task_id() != -1


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are installed: non-reentrant checkpointing runs its forward under them."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # torch < 2.3 cannot tell: keep a record, to be safe
        return True
    try:
        return top(False) is not None
    except TypeError:  # pragma: no cover - a torch whose getter takes no argument
        return top() is not None


def checkpoint_region():
    """The ``torch.utils.checkpoint`` region this call runs in, original forward or recompute; None
    outside one (or with a torch whose checkpoint this does not know)."""
    frame = sys._getframe(1)
    for _ in range(_STACK_LIMIT):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_filename == _CHECKPOINT_FILE:
            if code in _REENTRANT_CODES:  # reentrant: the node is the same in forward and in backward
                return frame.f_locals.get("ctx")
            if code.co_name == "unpack_hook":  # non-reentrant recompute, run from a saved tensor's unpack
                return frame.f_locals.get("frame")
            if "gen" in code.co_varnames:  # non-reentrant original forward: the generator holds the frame
                generator = frame.f_locals.get("gen")
                state = getattr(generator, "gi_frame", None)
                return None if state is None else state.f_locals.get("new_frame")
        frame = frame.f_back
    return None


def _weak(region):
    if region is None:
        return None
    try:
        return weakref.ref(region)
    except TypeError:  # pragma: no cover - a region object without weak references: treated as none
        return None


class Record:
    """One synced forward's results: the local statistics packet that identifies its input, what the
    exchange gave (global mean and variance, global count), and its checkpoint region."""

    __slots__ = ("order", "local", "mean", "var", "total", "region", "__weakref__")

    def __init__(self, order, local, mean, var, total, region) -> None:
        self.order, self.local, self.mean, self.var, self.total = order, local, mean, var, total
        self.region = _weak(region)


class ForwardRecords:
    """What one synced layer's recent forwards computed, so that an activation checkpoint's recompute
    of one of them reuses it: no second collective and no second running-statistics update.

    A forward that runs with gradients on under saved-tensor hooks (non-reentrant checkpointing) keeps
    its record on its autograd node, so the record lives exactly as long as the graph that can
    recompute it. A training forward with gradients off (reentrant checkpointing runs the function so
    the first time) has no node: its record joins a queue of the last ``UNTIED_LIMIT`` such forwards.
    Forwards with gradients on and no hooks cannot be recomputed and keep nothing.
    """

    UNTIED_LIMIT = 64

    def __init__(self) -> None:
        self._tied: List["weakref.ref[Record]"] = []
        self._untied = collections.deque(maxlen=self.UNTIED_LIMIT)
        self._added = 0
        self._cursor: Tuple[int, dict] = (-1, {})  # (graph task, id(region) -> calls recomputed so far)
        # comm.current_route() of the latest forward: a recompute that autograd runs on its device
        # thread (CUDA) sees no route of its own, and its backward must go where the forward's went.
        self.route = None

    def __reduce__(self):
        # A copied or pickled layer starts with no records: they belong to this process's graphs.
        return (ForwardRecords, ())

    @staticmethod
    def wanted() -> bool:
        """Whether a synced forward that runs now could be recomputed by a checkpoint."""
        return not torch.is_grad_enabled() or _saved_tensor_hooks_active()

    def add(self, owner, local: Tensor, mean, var, total, region, route=None) -> None:
        """Keep a forward's results; ``owner`` is its autograd context, or None without gradients;
        ``region`` its ``checkpoint_region()``; ``route`` its ``comm.current_route()``."""
        self._added += 1
        self.route = route
        record = Record(self._added, local, mean, var, total, region)
        if owner is None:
            self._untied.append(record)
            return
        owner.syncnorm_record = record  # the node holds the record; the layer only a weak reference
        self._tied = [ref for ref in self._tied if ref() is not None]
        self._tied.append(weakref.ref(record))

    def _live(self) -> List[Record]:
        records = [record for record in (ref() for ref in self._tied) if record is not None]
        return sorted(records + list(self._untied), key=lambda record: record.order)

    def find(self, local: Tensor, host_reads: bool) -> Tuple[Optional[Record], Union[bool, Tensor]]:
        """The kept forward that this recompute repeats, and whether it saw that forward's input.

        The validity is a Python bool where ``host_reads`` (CPU tensors, eager), else a 0-dim bool
        tensor computed on the device: nothing here reads a device tensor back to the host, and no
        per-record ``torch.equal`` runs (each would be a synchronization on CUDA). The record is None
        when this layer kept none (the call is then invalid).
        """
        records = self._live()
        region = checkpoint_region()
        if region is not None:
            own = [record for record in records if record.region is not None and record.region() is region]
            if own:
                task, counts = self._cursor
                if task != torch._C._current_graph_task_id():
                    task, counts = torch._C._current_graph_task_id(), {}
                    self._cursor = (task, counts)
                index = counts.get(id(region), 0)
                counts[id(region)] = index + 1
                # A pass reruns the region's calls in their original order: the k-th is the k-th.
                record = own[min(index, len(own) - 1)]
                valid = _same_bits(record.local, local)
                if index >= len(own):
                    valid = False  # more recomputed calls than the region made: not its forward
                return record, _as_flag(valid, host_reads)
        return _by_bits(records, local, host_reads)


def _same_bits(a: Tensor, b: Tensor):
    """0-dim bool tensor: ``a`` and ``b`` hold the same bits (one op chain, no host read)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (_bits(a) == _bits(b)).all()


def _bits(tensor: Tensor) -> Tensor:
    """``tensor``'s bits as integers: equal bits compare equal, NaN included, and -0.0 differs from 0.0."""
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _as_flag(valid, host_reads: bool):
    if isinstance(valid, bool) or not host_reads:
        return valid
    return bool(valid)  # a CPU tensor in eager mode: reading it costs no synchronization


def _by_bits(records: List[Record], local: Tensor, host_reads: bool):
    """Without a region: the newest record whose local statistics have ``local``'s bits. Invalid when
    none has, or when another one with the same bits has other global results (which of them this
    call repeats cannot be told)."""
    records = [record for record in records if record.local.shape == local.shape]
    if not records:
        return None, False
    records.reverse()  # newest first
    stacked = _bits(torch.stack([record.local for record in records]))
    hits = (stacked == _bits(local)).all(1)
    if host_reads:  # CPU tensors: plain Python from here
        matching = [record for record, hit in zip(records, hits.tolist()) if hit]
        if not matching:
            return records[0], False
        chosen = matching[0]
        return chosen, all(_same_results(chosen, other) for other in matching[1:])
    # On the device: the first hit (argmax returns the first maximum), valid when there is one and no
    # other hit has other global results. Records here all hold device tensors (no empty-batch shortcut).
    index = hits.int().argmax()
    means = torch.stack([record.mean for record in records])
    vars = torch.stack([record.var for record in records])
    totals = torch.stack([torch.as_tensor(record.total, device=local.device) for record in records])
    differs = (means != means[index]).any(1) | (vars != vars[index]).any(1) | (totals != totals[index])
    valid = hits.any() & ~(differs & hits).any()
    chosen = Record(0, local, means[index], vars[index], totals[index], None)
    return chosen, valid


def _same_results(a: Record, b: Record) -> bool:
    if isinstance(a.total, int) or isinstance(b.total, int):
        if a.total != b.total:
            return False
        if a.mean is None or b.mean is None:
            return a.mean is None and b.mean is None
    return bool(_same_bits(a.mean, b.mean)) and bool(_same_bits(a.var, b.var))
