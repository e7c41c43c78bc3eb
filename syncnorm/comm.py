"""Every ``torch.distributed`` call syncnorm makes lives in this file.

Per synced layer and training step: forward, one ``all_gather`` of a packet per rank (count, channel
count, the 7-float identity tail of ``_identity.py``, mean and variance, zero-padded to the group's packet
width); backward, one sum of a packet as wide (tail, ``sum_dy``, ``invstd * sum_dy_xmu``); and once, when
a layer wider than any before first syncs on its group, a width request (``functional._packet_width``).
Compiled code issues them as functional collectives, traced into the graph; eager code as c10d calls,
which let gloo overlap the backward sum with local work. On CUDA neither waits on the host.

Every function here that communicates must be called by all ranks of the group, in the same order.
Without an initialized process group they return the one-process answer, so callers never branch.
"""

import contextlib
import itertools
import json
import threading
import weakref
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from syncnorm import _identity
from syncnorm._compat import is_compiling

ProcessGroup = Optional["dist.ProcessGroup"]

# Bound at import: resolve_group then costs one isinstance, also inside a compiled function.
try:
    from torch.distributed.device_mesh import DeviceMesh as _DeviceMesh
except ImportError:  # pragma: no cover - torch built without torch.distributed
    _DeviceMesh = None

# torch 2.14 renamed all_gather_into_tensor (older releases only have the old name).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Largest group whose backward sum of CPU tensors is an all_gather and a local sum, not an all_reduce:
# cheaper on gloo (docs/performance.md, "all_gather + local sum vs all_reduce"); CUDA and larger groups all_reduce.
GATHER_SUM_MAX_WORLD = 4

# A one-rank group sends nothing; the one-GPU test and benchmark set this to send real NCCL calls anyway.
_COLLECTIVES_AT_ONE_RANK = False


def is_distributed() -> bool:
    """True when ``torch.distributed`` is built in and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(group):
    """The process group behind ``group``: a ``ProcessGroup`` or None as is; a 1-D ``DeviceMesh`` (or one
    named dimension of a larger mesh, ``mesh["dp"]``) its group. Raises for a mesh with more than one
    dimension, whose layers would not know which dimension to sync over."""
    if _DeviceMesh is None or not isinstance(group, _DeviceMesh):
        return group
    if group.ndim != 1:
        names = group.mesh_dim_names or ()
        pick = f'mesh["{names[0]}"]' if names else "a 1-D mesh"
        raise ValueError(
            f"expected a process group, a 1-D DeviceMesh or one dimension of a mesh (got a {group.ndim}-D "
            f"DeviceMesh with dimensions {names or 'unnamed'}); pass the data-parallel dimension, e.g. {pick}"
        )
    return group.get_group()


def world_size(group: ProcessGroup = None) -> int:
    """Number of ranks in ``group`` (the default group when None); 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def in_group(group: ProcessGroup = None) -> bool:
    """Whether this process is a member of ``group`` (always without a process group)."""
    return not is_distributed() or group is None or dist.get_rank(group) >= 0


def group_ranks(group: ProcessGroup = None) -> List[int]:
    """Global ranks of the members of ``group``, in group order."""
    if not is_distributed():
        return [0]
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


# Routing, for ``syncnorm.join``: inside it a thread's synced collectives of a group go over a *side group*
# of the same ranks (a stand-in rank would issue them in another order relative to DDP's all_reduces, and gloo
# pairs collectives by order); an observer sees each, for join.py to replay. A route belongs to the thread
# that entered ``routed`` (other threads keep their groups); a backward or recompute that autograd runs on
# another thread passes its forward's route (``current_route()`` then, or ``follow``). Side groups are kept
# per default process group: a new ``init_process_group`` starts with none.


class Route:
    """Where one thread's synced collectives go while ``routed`` is entered (see above)."""

    __slots__ = ("side_groups", "observer", "active")

    def __init__(self, side_groups: Dict[int, Any], observer: Optional[Callable[[str, Tensor, Any], None]]) -> None:
        self.side_groups = side_groups  # id(process group) -> its side group; the default group's id for None
        self.observer = observer
        self.active = True  # False once the context is left: a late backward is not routed


_ROUTING = threading.local()
# Side groups by the ranks of the group they stand beside, per default process group (weakly held, so a
# destroyed default group takes its side groups along).
_SIDE_GROUPS: "weakref.WeakKeyDictionary[Any, Dict[Tuple[int, ...], Any]]" = weakref.WeakKeyDictionary()


def current_route() -> Optional[Route]:
    """This thread's route, or None outside ``routed``."""
    return getattr(_ROUTING, "route", None)


def follow(route: Optional[Route]) -> Optional[Route]:
    """Make ``route`` this thread's (None: none) and return the one it had: a checkpoint's recompute that
    autograd runs on its own thread follows its forward's route (join.py)."""
    previous, _ROUTING.route = current_route(), route
    return previous


@contextlib.contextmanager
def routed(side_groups: Dict[int, Any], observer: Optional[Callable[[str, Tensor, Any], None]] = None
           ) -> Iterator[Route]:
    """Send this thread's collectives on the groups in ``side_groups`` over their side groups.

    ``side_groups`` maps ``id(group)`` (the default group's id for None) to the side group, as
    :func:`side_groups` returns it; ``observer(kind, tensor, group)`` is called before each routed
    collective, ``kind`` being "gather" or "sum". One route per thread at a time.
    """
    if current_route() is not None:
        raise RuntimeError("expected one comm.routed context per thread (got one inside another, e.g. a "
                           "syncnorm.join inside another)")
    route = _ROUTING.route = Route(dict(side_groups), observer)
    try:
        yield route
    finally:
        route.active = False
        _ROUTING.route = None


def side_groups(groups: Sequence[Any]) -> Dict[int, Any]:
    """A side group for each of ``groups`` (None: the default group): a new group with the same ranks,
    created once per default process group and set of ranks. Returns ``id(group) -> side group`` (the
    default group under its own id). All ranks must call this together (each rank with its own groups:
    every rank creates every rank's, in the same order, as ``new_group`` requires)."""
    world = dist.group.WORLD
    made = _SIDE_GROUPS.setdefault(world, {})
    mine = sorted({tuple(group_ranks(group)) for group in groups})
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for ranks in sorted({ranks for wanted in everyone for ranks in wanted}):
        if ranks not in made:
            made[ranks] = dist.new_group(list(ranks))
    return {id(world if group is None else group): made[tuple(group_ranks(group))] for group in groups}


def canonical(group: ProcessGroup):
    """The group syncnorm's collectives for ``group`` go over: the default group for any group of every
    rank. Two groups of the same ranks are two queues, and ranks that reached their layers in different
    orders would each wait in another one; over one group they meet, and the identity check reports."""
    world = dist.group.WORLD
    if group is None or group is world or dist.get_world_size(group) == dist.get_world_size():
        return world
    return group


def _route(kind: str, tensor: Tensor, group: ProcessGroup, route: Optional[Route] = None):
    """``group``'s canonical group, or its side group under a route (``route``, else this thread's)."""
    route = route or getattr(_ROUTING, "route", None)
    side = route.side_groups.get(id(dist.group.WORLD if group is None else group)) if route and route.active else None
    if side is None:
        return canonical(group)
    if route.observer is not None:
        route.observer(kind, tensor, group)
    return side


def all_gather(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Every rank's 1-D ``tensor`` stacked into a ``(world, len)`` tensor. All ranks must call this."""
    size = world_size(group)
    if size == 1 and not _COLLECTIVES_AT_ONE_RANK:
        return tensor.unsqueeze(0)
    group = _route("gather", tensor, group)
    if is_compiling():
        from torch.distributed import _functional_collectives as funcol

        # torch 2.14 renamed all_gather_tensor to all_gather_single (as for the c10d call above).
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        gathered = gather(tensor.contiguous(), 0, group)
        return gathered.view(size, tensor.numel())
    work, gathered = _start_all_gather(tensor, group)
    _wait(work, group, tensor)
    return gathered


def _start_all_gather(tensor: Tensor, group: ProcessGroup):
    """Start an all_gather of 1-D ``tensor``; return its work handle and the ``(world, len)`` output."""
    size = world_size(group)
    gathered = tensor.new_empty(size * tensor.numel())  # gloo wants a flat output
    work = _all_gather_flat(gathered, tensor.contiguous(), group=group, async_op=True)
    return work, gathered.view(size, tensor.numel())


def sum_across_ranks(tensor: Tensor, group: ProcessGroup = None, route: Optional[Route] = None) -> Tensor:
    """Element-wise sum of ``tensor`` over the ranks of ``group``, the same bits on every rank: one collective,
    which all ranks must call. ``route`` as for ``start_sum_across_ranks``."""
    return start_sum_across_ranks(tensor, group, route)()


def start_sum_across_ranks(tensor: Tensor, group: ProcessGroup = None,
                           route: Optional[Route] = None) -> Callable[[], Tensor]:
    """Start ``sum_across_ranks`` and return a function that waits for it and returns the sum; the caller
    may compute meanwhile, but not modify ``tensor``. All ranks must call this; exactly one collective.
    ``route``: the route of the forward this sum belongs to (``current_route()`` then); None: this thread's.
    """
    size = world_size(group)
    if size == 1 and not _COLLECTIVES_AT_ONE_RANK:
        return lambda: tensor
    group = _route("sum", tensor, group, route)
    if is_compiling():
        from torch.distributed import _functional_collectives as funcol

        # The compiler schedules the wait; a functional collective leaves its input untouched.
        summed = funcol.all_reduce(tensor, "sum", group)
        return lambda: summed
    if size <= GATHER_SUM_MAX_WORLD and tensor.device.type == "cpu":
        work, rows = _start_all_gather(tensor, group)

        def finish_gather() -> Tensor:
            _wait(work, group, tensor)
            if size == 2:
                # Two rows: one in-place add; a reduction over a dimension of 2 costs several times more.
                first, second = rows.unbind(0)
                return first.add_(second)
            return rows.sum(0)

        return finish_gather
    work = dist.all_reduce(tensor, group=group, async_op=True)

    def finish_reduce() -> Tensor:
        _wait(work, group, tensor)
        return tensor

    return finish_reduce


# Floats per synced packet, per group: one length for every packet of a group, so that ranks at different
# layers meet in a collective gloo completes (it aborts on other sizes) and the identity check reports.
_WIDTHS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def packet_width(group: ProcessGroup, minimum: int) -> int:
    """The packet width agreed for ``group`` so far (``minimum`` before any)."""
    return _WIDTHS.get(canonical(group), minimum) if is_distributed() else minimum


def set_packet_width(group: ProcessGroup, width: int) -> None:
    """Record the packet width all ranks of ``group`` agreed on."""
    if is_distributed():
        _WIDTHS[canonical(group)] = width


# Waits that cannot end. Ranks that reached synced layers of different process groups (a subgroup layer one
# member skipped; two groups of the same ranks, but not every rank, called in another order) each wait in a
# collective that a rank they wait for never joins, and no packet of one reaches the other. So a CPU
# collective (gloo) that waits longer than STALL_SECONDS posts where it waits to the default group's store,
# and reads the others' posts every _POLL_SECONDS: rank r waits *for* rank b when b is a member of r's group
# that waits in another group. A cycle of such waits, seen twice alike, can never end, and every rank in it
# or waiting on it raises, naming each rank's collective. Waits on a slow rank form no cycle and continue.
# Only processes whose synced collectives all come from one thread post (another thread could still arrive).
# Eager only (compiled code waits inside the graph); the store is private to torch (``_get_default_store``).
STALL_SECONDS: Optional[float] = 2.0  # None: wait without watching
_POLL_SECONDS = 0.5
_POSTS = itertools.count()
_THREADS = set()  # threads of this process that waited for a synced collective


def _wait(work, group: ProcessGroup, packet: Tensor) -> None:
    """Wait for ``work``, a collective sending ``packet`` over ``group``; raise on a cycle of waits."""
    _THREADS.add(threading.get_ident())
    if STALL_SECONDS is None or packet.device.type != "cpu" or len(_THREADS) > 1:
        work.wait()
        return
    if _waited(work, STALL_SECONDS):
        return
    store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    if store is None:
        work.wait()
        return
    tail = packet[2 : 2 + _identity.TAIL].tolist()
    code = _identity.decode(tail) if len(tail) == _identity.TAIL else None
    mine = {"group": getattr(group, "group_name", ""), "ranks": group_ranks(group),
            "what": "a syncnorm collective" if code is None else _identity.describe(code), "post": next(_POSTS)}
    key = f"syncnorm/waits/{dist.get_rank()}"
    store.set(key, json.dumps(mine))
    seen = None
    while not _waited(work, _POLL_SECONDS):
        cycle = _wait_cycle(store, dist.get_rank())
        if cycle is not None and cycle == seen:  # the post stays: this rank never leaves this wait
            waits = "; ".join(f"rank {rank} waits in {post['what']} over ranks {post['ranks']}" for rank, post in cycle)
            raise RuntimeError(
                f"SyncBatchNorm: the ranks wait for each other in synced collectives of different process groups "
                f"and would hang until the process-group timeout ({waits}; this rank waits in {mine['what']} "
                f"over ranks {mine['ranks']}). Every rank must call the synced layers of each group in the same "
                "order, none skipped; see docs/semantics.md, 'When ranks diverge'"
            )
        seen = cycle
    store.set(key, "")


def _waited(work, seconds: float) -> bool:
    """Whether ``work`` finished within ``seconds``; its own errors propagate."""
    try:
        work.wait(timedelta(seconds=seconds))
    except RuntimeError as error:
        if "Operation timed out" not in str(error):
            raise
        return False
    return True


def _wait_cycle(store, start: int) -> Optional[List[Tuple[int, Dict[str, Any]]]]:
    """A cycle of waits that ``start`` is in or waits on, as ``(rank, post)`` pairs; None if there is none."""
    posts: Dict[int, Any] = {}

    def post(rank: int):
        if rank not in posts:
            text = store.compare_set(f"syncnorm/waits/{rank}", "", "").decode()  # "" if none, without blocking
            posts[rank] = json.loads(text) if text else None
        return posts[rank]

    def waits_for(rank: int) -> Iterator[int]:
        return iter([other for other in post(rank)["ranks"]
                     if other != rank and post(other) is not None and post(other)["group"] != post(rank)["group"]])

    path, finished, stack = [start], set(), [waits_for(start)]
    while stack:
        rank = next(stack[-1], None)
        if rank is None:
            finished.add(path.pop())
            stack.pop()
        elif rank in path:
            return [(member, posts[member]) for member in path[path.index(rank):]]
        elif rank not in finished:
            path.append(rank)
            stack.append(waits_for(rank))
    return None
