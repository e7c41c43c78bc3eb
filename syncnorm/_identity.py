"""Which synced layer a collective belongs to, carried in the packets the layers already send.

Every synced gather and backward sum carries, at the same place (slots 2 to 8), a 7-value tail
``[1, d0, d1, d2, d0^2, d1^2, d2^2]``, ``d`` the base-64 digits of ``3 * key + phase`` (phase 0: forward,
1: backward, 2: a checkpoint's recomputed forward), so a gather that meets a backward sum names it too.
A gather shows every rank's tail; a sum shows ``p = sum(1)``, ``sum(d)`` and ``sum(d^2)``, and
``p * sum(d^2) == sum(d)^2`` holds for every digit exactly when all ranks that took part sent the same
digits (Cauchy-Schwarz), exact in float32 up to ``2^24`` (4096 ranks of ``63^2``). A rank that takes no
part (``syncnorm.join``'s stand-in sums zeros) adds nothing and keeps the check valid.

``key``: from the layer's qualified name when ``convert_sync_batchnorm`` names it (the same on every rank
that converts the same model), else its construction order. Layers built inside ``unnumbered`` take no
construction number, so a walk on one rank only (an export's revert) shifts no other layer's key.
"""

import contextlib
import itertools
import zlib
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor

from syncnorm._compat import is_compiling

DIGITS, BASE = 3, 64
TAIL = 1 + 2 * DIGITS
CHECK_MAX_WORLD = 4096  # sums of 63^2 stay exact in float32 up to this many ranks
_ORDER_KEYS = 4096  # keys below: construction order; at and above: qualified names
_KEYS = BASE ** DIGITS // 3
PHASES = ("forward", "backward", "recomputed forward")
_NAMES: Dict[int, str] = {0: "a sync_batch_norm call outside a SyncBatchNorm layer"}
_BUILT = itertools.count(1)
_NUMBERING = [True]


@contextlib.contextmanager
def unnumbered() -> Iterator[None]:
    """Layers built inside take no construction number (their identity is named later, or never used)."""
    _NUMBERING.append(False)
    try:
        yield
    finally:
        _NUMBERING.pop()


class LayerIdentity:
    """A synced layer's key, its description for error messages, its cached packet tails, and the packet
    width its group had at its last eager call (what a compiled graph pads to: it cannot ask)."""

    __slots__ = ("key", "name", "_tails", "width")

    def __init__(self, key: int, name: str) -> None:
        self.key, self.name, self._tails, self.width = key, name, {}, None
        _NAMES[key] = name

    def __reduce__(self):
        # Copies and pickles keep the key and drop the cached tensors.
        return (LayerIdentity, (self.key, self.name))

    @classmethod
    def built(cls, class_name: str, num_features: int) -> "LayerIdentity":
        if not _NUMBERING[-1]:
            return FUNCTIONAL
        number = next(_BUILT)
        return cls(number % _ORDER_KEYS, f"{class_name}({num_features}) number {number} in construction order")

    @classmethod
    def named(cls, path: str) -> "LayerIdentity":
        key = _ORDER_KEYS + zlib.crc32(path.encode()) % (_KEYS - _ORDER_KEYS)
        return cls(key, f"'{path}'")

    def values(self, phase: int) -> List[int]:
        cached = self._tails.get(phase)
        if cached is None:
            digits = [(3 * self.key + phase) // BASE ** i % BASE for i in range(DIGITS)]
            cached = [1] + digits + [d * d for d in digits]
            if not is_compiling():  # a write from inside a traced backward is a graph break
                self._tails[phase] = cached
        return cached

    def tail(self, like: Tensor, phase: int, channels: int = 0, pad: int = 0) -> Tensor:
        """A packet's head after the count slot: ``[channels, tail..., 0 * pad]`` for a forward (phase 0 or
        2), ``[0, 0, tail..., 0 * pad]`` for a backward sum, in ``like``'s dtype and device; cached in eager
        mode (no copy to the device after the first), a constant in compiled graphs."""
        values = ([0, 0] if phase == 1 else [channels]) + self.values(phase) + [0] * pad
        if is_compiling():
            return like.new_tensor(values)
        index = (like.dtype, like.device, phase, channels, pad)
        cached = self._tails.get(index)
        if cached is None:
            cached = self._tails[index] = like.new_tensor(values)
        return cached


FUNCTIONAL = LayerIdentity(0, _NAMES[0])


def describe(code: int) -> str:
    key, phase = divmod(code, 3)
    name = _NAMES.get(key, f"a layer this process does not know (key {key})")
    return f"{name} ({PHASES[phase]})"


def decode(values: List[float]) -> Optional[int]:
    """The ``3 * key + phase`` of one rank's tail from a gather; None if it is no tail (another collective)."""
    one, digits, squares = values[0], values[1 : 1 + DIGITS], values[1 + DIGITS :]
    if one != 1 or any(d != int(d) or not 0 <= d < BASE or d * d != s for d, s in zip(digits, squares)):
        return None
    return sum(int(d) * BASE ** i for i, d in enumerate(digits))


def gather_mismatch(tails: List[List[float]], mine: LayerIdentity, ranks: Callable[[], List[int]],
                    phase: int = 0) -> Optional[str]:
    """Why the gathered tails are not all this layer's ``phase`` (as an error message), or None;
    ``ranks()`` gives the group's global ranks (called only for the message)."""
    expected = mine.values(phase)
    if all(tail == expected for tail in tails):
        return None
    seen = []
    for rank, tail in zip(ranks(), tails):
        code = decode(tail)
        seen.append(f"rank {rank}: " + (describe(code) if code is not None else "another kind of collective"))
    return _message(describe(3 * mine.key + phase), "; ".join(seen))


def sum_mismatch(sums: List[float], mine: LayerIdentity, world: int) -> Optional[str]:
    """Why a backward sum's tail shows other layers than this one, or None; ``sums`` is the summed tail."""
    if world > CHECK_MAX_WORLD:
        return None
    p, totals, squares = sums[0], sums[1 : 1 + DIGITS], sums[1 + DIGITS :]
    if all(p * s == t * t for t, s in zip(totals, squares)) and p <= world:
        return None
    others = "other layers or phases"
    if p == 2:  # one other rank: its digits are the sum minus ours
        code = sum(int(t - d) * BASE ** i for i, (t, d) in enumerate(zip(totals, mine.values(1)[1 : 1 + DIGITS])))
        others = describe(code) if 0 <= code < 3 * _KEYS else "another kind of collective"
    return _message(describe(3 * mine.key + 1), f"the other rank(s): {others}")


def _message(this: str, others: str) -> str:
    return (f"SyncBatchNorm: the ranks reached different synced layers in the same collective (this rank: {this}; "
            f"{others}). Every rank must call the same synced layers in the same order, none skipped; see "
            "docs/semantics.md, 'When ranks diverge'")


def device_check_forward(gathered_tails: Tensor, mine: Tensor) -> None:
    """On-device assert that every rank's gathered tail is this layer's forward tail."""
    torch._assert_async((gathered_tails == mine).all(), _DEVICE_MESSAGE)


def device_check_sum(summed_tail: Tensor, world: int) -> None:
    """On-device assert that a backward sum's tail comes from one layer on every rank that took part."""
    if world > CHECK_MAX_WORLD:
        return
    t = summed_tail.double()
    p, totals, squares = t[0], t[1 : 1 + DIGITS], t[1 + DIGITS :]
    torch._assert_async((p * squares == totals * totals).all(), _DEVICE_MESSAGE)


_DEVICE_MESSAGE = ("SyncBatchNorm: the ranks reached different synced layers in the same collective (a rank called "
                   "other layers, in another order, or skipped one); see docs/semantics.md, 'When ranks diverge'")
