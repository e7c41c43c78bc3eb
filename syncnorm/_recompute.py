"""Is a synced call an activation checkpoint's recompute? Decided from the autograd engine's state alone.

A recompute (any kind of checkpoint: it reruns a forward while the engine runs a backward) syncs again,
meeting the other ranks' recomputes, but must not count the step twice: it leaves the running statistics
and ``num_batches_tracked`` alone (docs/training_loops.md).
"""

import contextlib
import threading
from typing import Iterator, Union

import torch
from torch import Tensor

from syncnorm._compat import is_compiling

_FORCED = threading.local()  # syncnorm.join's stand-in replays a recompute outside any backward


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (torch's own FSDP and
    module tracker ask the same way; torch has no public name for it)."""
    return getattr(_FORCED, "on", False) or torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def as_recompute() -> Iterator[None]:
    """Synced calls on this thread inside the context are recomputes (for join's replay)."""
    _FORCED.on = True
    try:
        yield
    finally:
        _FORCED.on = False


def is_recompute(like: Tensor) -> Union[bool, Tensor]:
    """Whether a synced call running now is a recompute: a Python bool in eager code; in a compiled graph
    a 0-dim bool tensor that the graph computes each time it runs (a compiled block called inside an
    eager checkpoint region is rerun by the recompute, with no retrace)."""
    if is_compiling():
        return torch.ops.syncnorm.in_backward(like)
    return in_backward()


def _in_backward_tensor(like: Tensor) -> Tensor:
    return torch.full((), in_backward(), dtype=torch.bool, device=like.device)  # a fill, no host-to-device copy


def _in_backward_meta(like: Tensor) -> Tensor:
    return torch.empty((), dtype=torch.bool, device=like.device)


# An operator opaque to the compiler, so that the question is asked when the graph runs, not traced.
_LIBRARY = torch.library.Library("syncnorm", "DEF")
_LIBRARY.define("in_backward(Tensor like) -> Tensor")
_LIBRARY.impl("in_backward", _in_backward_tensor, "CompositeExplicitAutograd")
_LIBRARY.impl("in_backward", _in_backward_meta, "Meta")
