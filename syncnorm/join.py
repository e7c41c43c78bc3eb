"""``syncnorm.join``: training with synced layers when ranks have different numbers of batches.

torch's ``Join`` lets a rank that ran out of batches keep answering DDP's collectives ("shadow"
iterations), but not the collectives inside the model's forward and backward, so synced layers hang.
``join`` adds the stand-in: a rank that has run out repeats, in each shadow iteration, the synced
collectives of its own last iteration with empty inputs (zero counts). A :class:`CollectiveRecorder`
records them; the replay runs inside DDP's join hook, between DDP's forward shadow and its gradient
all_reduces, and the synced collectives go over a side group with the same ranks (``comm.routed``) so
that they cannot pair up with DDP's asynchronous all_reduces. How, and why ``update_bn_stats`` stands
in differently: docs/training_loops.md, "Uneven numbers of batches".
"""

import contextlib
import functools
import itertools
import threading
import weakref
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from syncnorm import comm, stats
from syncnorm._compat import is_compiling
from syncnorm._recompute import as_recompute, in_backward
from syncnorm.module import SyncBatchNorm

__all__ = ["join"]

# Last recorded iteration of each model, kept across join contexts: a rank with no batch at all in one
# context (epoch) replays what it recorded in an earlier one.
_LAST_ITERATION: "weakref.WeakKeyDictionary[nn.Module, List[tuple]]" = weakref.WeakKeyDictionary()


class CollectiveRecorder:
    """Records the synced collectives a model issues in one iteration and replays them as a stand-in.

    Used as a context manager (it hooks the model's ``SyncBatchNorm`` layers) inside ``comm.routed``
    with :meth:`observe` as the observer. Call :meth:`begin_iteration` before each real iteration; on a
    rank that has run out, call :meth:`replay` once for every iteration the other ranks still run.
    A layer call is recorded as one event and replayed by calling the layer on an empty batch (as a
    recompute if it was one), so its running statistics move as on the other ranks; any other
    collective is replayed as an empty rank's share (zeros, or an empty packet with the call's identity).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.events: Optional[List[tuple]] = None  # this context's current iteration; None before the first
        # (layer, shape, dtype, device, recompute) of the layer call under way, () once recorded, None outside
        self._call: Optional[tuple] = None
        self.route: Optional[comm.Route] = None  # the context's route, for a recompute on autograd's thread
        self._followed = threading.local()
        self._replaying = False
        self._handles: list = []

    def __enter__(self) -> "CollectiveRecorder":
        self._refuse_compiled = _refusal()
        for layer in self.model.modules():
            if isinstance(layer, SyncBatchNorm):
                self._handles.append(layer.register_forward_pre_hook(self._enter_layer))
                self._handles.append(layer.register_forward_hook(self._leave_layer))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.events is not None:
            _LAST_ITERATION[self.model] = self.events

    @property
    def has_recording(self) -> bool:
        """Whether there is an iteration to replay (recorded now or in an earlier context)."""
        return self.events is not None or self.model in _LAST_ITERATION

    def begin_iteration(self) -> None:
        """Start recording a new iteration; the previous one becomes the one :meth:`replay` repeats."""
        if self.events is not None:
            _LAST_ITERATION[self.model] = self.events
        self.events = []
        self._call = None

    def replay(self) -> None:
        """Issue the last recorded iteration's synced collectives with empty inputs. All ranks of the
        layers' groups must be running or replaying that iteration."""
        events = self.events if self.events is not None else _LAST_ITERATION.get(self.model)
        if events is None:
            raise RuntimeError("CollectiveRecorder.replay: expected a recorded iteration (got none)")
        self._replaying = True
        try:
            for event in events:
                if event[0] == "layer":
                    # The recorded shape, 0 in the batch dimension: fits a layer taking (N, L, C) too.
                    _, layer, shape, dtype, device, recompute = event
                    with torch.no_grad(), as_recompute() if recompute else contextlib.nullcontext():
                        layer(torch.empty((0,) + shape[1:], dtype=dtype, device=device))
                elif event[0] == "gather":  # a sync_batch_norm call outside a layer: an empty batch's packet
                    _, packet, group = event
                    # Not a width request (the group agreed its width in an iteration that every rank ran).
                    if packet[0].item() != stats.WIDTH_REQUEST:
                        comm.all_gather(stats.empty_share(packet, comm.packet_width(group, packet.numel())), group)
                else:  # a backward sum: zeros are an empty rank's share
                    _, numel, dtype, device, group = event
                    comm.sum_across_ranks(torch.zeros(numel, dtype=dtype, device=device), group)
        finally:
            self._replaying = False

    def _enter_layer(self, layer: nn.Module, args: tuple) -> None:
        if self._replaying:
            return
        input = args[0] if args else None
        if isinstance(input, Tensor):
            recompute = in_backward()
            self._call = (layer, tuple(input.shape), input.dtype, input.device, recompute)
            if recompute and comm.current_route() is None and self.route is not None:
                # A recompute that autograd runs on its own thread (CUDA): its collectives go where this
                # thread's forward sent them.
                self._followed.previous = comm.follow(self.route)

    def _leave_layer(self, layer: nn.Module, args: tuple, output: Any) -> None:
        self._call = None
        if hasattr(self._followed, "previous"):
            comm.follow(self._followed.__dict__.pop("previous"))

    def observe(self, kind: str, tensor: Tensor, group) -> None:
        """The ``comm.routed`` observer: records each routed collective of a real iteration."""
        if is_compiling():
            self._refuse_compiled()
        if self._replaying or self.events is None:
            return
        if self._call is not None:
            # One event per layer call, whatever it sends (a wider layer's first call adds a width
            # request): the replayed call sends it again, deciding as the layer does.
            if self._call:
                self.events.append(("layer",) + self._call)
                self._call = ()
            return
        if kind == "gather":
            self.events.append((kind, tensor.clone(), group))
        else:
            self.events.append((kind, tensor.numel(), tensor.dtype, tensor.device, group))


@functools.lru_cache(maxsize=None)  # made on first use: importing torch._dynamo takes about a second
def _refusal():
    """The error for a synced layer in a compiled function, hidden from dynamo: it raises when the graph
    runs (before the collective, at the same call on every rank), not while tracing, after which dynamo
    would run the frame partly compiled (running statistics no longer bitwise equal, recorder uninformed)."""
    import torch._dynamo

    @torch._dynamo.disable
    def refuse() -> None:
        raise ValueError(
            "syncnorm.join expected synced layers that run eagerly (got one inside a function compiled by "
            "torch.compile); run the iterations inside syncnorm.join without torch.compile"
        )

    return refuse


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs under ``torch.compile``."""
    return any(type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None
               for module in model.modules())


class _Session(Joinable, JoinHook):
    """What one ``join`` context knows (the recorder, the join group and its side, a pending check); also
    the Joinable of a model without DDP, whose join hook runs the stand-in."""

    def __init__(self, root: nn.Module, group, device: torch.device) -> None:
        super().__init__()
        self.recorder = CollectiveRecorder(root)
        self.group = group  # the join group (DDP's), never None
        self.device = device
        self.side = None
        self.check_pending = False

    def begin_iteration(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the model: an active rank starts an iteration."""
        self.recorder.begin_iteration()
        if self.check_pending:
            self._check_recordings(missing=False)

    def stand_in(self) -> None:
        """One shadow iteration of a rank that has run out of batches."""
        if self.check_pending:
            self._check_recordings(missing=not self.recorder.has_recording)
        self.recorder.replay()

    def _check_recordings(self, missing: bool) -> None:
        """First iteration of a context entered by a rank with nothing to replay: every rank learns
        whether some rank ran out before its first iteration, and all raise together if so."""
        self.check_pending = False
        flags = comm.all_gather(torch.tensor([1.0 if missing else 0.0], device=self.device), self.side)
        ranks = comm.group_ranks(self.group)
        empty = [str(ranks[i]) for i, flag in enumerate(flags.flatten().tolist()) if flag]
        if empty:
            raise ValueError(
                "syncnorm.join expected every rank to run at least one iteration before it runs out "
                f"(got none on rank(s) {', '.join(empty)}, and no earlier iteration to repeat): a rank "
                "that has run out repeats its last iteration with an empty batch; give every rank at "
                "least one batch in the first syncnorm.join of a model"
            )

    def join_hook(self, **kwargs) -> JoinHook:
        return self

    def main_hook(self) -> None:
        self.stand_in()

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self):
        return self.group


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (the CPU for a model without any); also the
    device update_bn_stats exchanges its packets on."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@contextlib.contextmanager
def join(model: nn.Module, *other_joinables: Joinable, **join_kwargs) -> Iterator[None]:
    r"""Train a model with synced layers on ranks that have different numbers of batches.

    A context manager around torch's :class:`~torch.distributed.algorithms.join.Join`: inside it each
    rank runs as many iterations (forward, backward, optimizer step) as it has batches. A rank that has
    run out waits at the end of the ``with`` block and, while other ranks still run iterations, stands
    in for them: it answers DDP's collectives and repeats the synced layers' collectives of its own last
    iteration with an empty batch. So nothing hangs and nothing is approximated:

    * each iteration's batch statistics are BatchNorm's over the batches of the ranks still running;
    * running statistics and ``num_batches_tracked`` move on every rank and end identical on all;
    * gradients follow DDP's join semantics (the ranks that ran out contribute zero; see
      ``divide_by_initial_world_size``).

    Every iteration inside the context must call the same synced layers in the same order and mode
    (evaluate outside it); a rank that runs out before its first iteration needs an iteration recorded
    in an earlier ``join`` of the same model, else every rank raises ``ValueError``. The synced
    collectives go over a side process group with the same ranks, created on first entry; routing is
    per thread. All ranks must call this. Eager only: a model under ``torch.compile`` is a
    ``ValueError`` on entry, a compiled function inside its forward one at its first synced layer.
    Details and limits: docs/training_loops.md.

    Args:
        model: the ``DistributedDataParallel`` model, or a model without DDP (e.g. for forward-only
            passes in training mode); its ``SyncBatchNorm`` layers are the ones stood in for.
        *other_joinables: further :class:`~torch.distributed.algorithms.join.Joinable` s, e.g. a
            ``ZeroRedundancyOptimizer``; their hooks run after the model's.
        **join_kwargs: passed to ``Join``: ``enable``, ``throw_on_early_termination``,
            ``divide_by_initial_world_size``.

    Example::

        >>> model = DistributedDataParallel(syncnorm.convert_sync_batchnorm(net))
        >>> with syncnorm.join(model):
        ...     for x, y in my_shard:          # a different number of batches on each rank
        ...         loss_fn(model(x), y).backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad()
    """
    from torch.nn.parallel import DistributedDataParallel

    if _compiled(model):
        raise ValueError(
            "syncnorm.join expected an eager model (got one that runs under torch.compile); "
            "train inside syncnorm.join with the uncompiled model"
        )
    if not comm.is_distributed():
        yield  # one process: nothing to stand in for
        return
    ddp = model if isinstance(model, DistributedDataParallel) else None
    if ddp is not None and not hasattr(ddp, _DDP_HOOK_POINT):
        raise RuntimeError(
            f"syncnorm.join expected DistributedDataParallel.{_DDP_HOOK_POINT} (got a torch "
            f"{torch.__version__} without it); use a torch release that has it"
        )
    if ddp is None:
        root, session = model, _Session(model, dist.group.WORLD, _model_device(model))
    else:
        root, session = ddp.module, _Session(ddp.module, ddp.process_group, ddp.join_device)
    routes = comm.side_groups([m.process_group for m in root.modules() if isinstance(m, SyncBatchNorm)]
                              + [session.group])
    session.side = routes[id(session.group)]
    with comm.routed(routes, session.recorder.observe) as session.recorder.route, session.recorder:
        # Once per context: is there a rank with nothing to replay? Then the first iteration checks
        # whether such a rank ran out before running one (one small gather, all ranks together).
        mine = torch.tensor([0.0 if session.recorder.has_recording else 1.0], device=session.device)
        session.check_pending = bool(comm.all_gather(mine, session.side).any())
        hooks = []
        try:
            if ddp is None:
                def announce(module: nn.Module, args: tuple) -> None:
                    # Join requires its first Joinable to announce every iteration before its collectives.
                    Join.notify_join_context(session)

                hooks.append(root.register_forward_pre_hook(announce))
            else:
                _patch_ddp(ddp, session)
            hooks.append(root.register_forward_pre_hook(session.begin_iteration))
            with Join([session if ddp is None else ddp, *other_joinables], **join_kwargs):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            if ddp is not None:
                ddp.__dict__.pop(_DDP_HOOK_POINT, None)


# The DDP method that its join hook calls on a joined rank after shadowing the forward's collectives
# (buffer broadcast) and before the gradient all_reduces; the stand-in runs right after it.
_DDP_HOOK_POINT = "_check_global_requires_backward_grad_sync"


def _patch_ddp(ddp: nn.Module, session: _Session) -> None:
    """Make DDP's join hook run the synced layers' stand-in between its forward and backward shadows."""
    original = getattr(ddp, _DDP_HOOK_POINT)

    def check_then_stand_in(is_joined_rank):
        result = original(is_joined_rank)
        if is_joined_rank:
            session.stand_in()
        return result

    ddp.__dict__[_DDP_HOOK_POINT] = check_then_stand_in
