"""What a failed collective means, said in one line.

When a collective (or the process group's store) raises during a run, :func:`is_collective_failure`
tells whether it is the kind of error a lost or stuck peer causes, and
:func:`describe_collective_failure` writes the one-line message: where it happened (phase, epoch,
step), the process-group timeout, and the ranks that did not report the failure themselves (found
through the process group's store), i.e. the likely culprits.
"""

import os
import re
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

# What gloo/NCCL/the store say when a peer is gone or never came (older torch: plain RuntimeError).
_COLLECTIVE_SIGNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                     "broken pipe", "connection refused", "gloo", "nccl", "socket")
_TIMEOUT_SIGNS = ("timed out", "timeout")
# What a backend says when it lacks an operation (these mention "gloo" too, but no peer is lost).
_UNSUPPORTED_SIGNS = ("no support for", "not supported", "unsupported", "not implemented")
_BACKEND_NAMES = ("gloo", "nccl", "mpi", "ucc", "process group", "processgroup", "backend")


def first_line(error: BaseException) -> str:
    """The informative part of an error: first line, without gloo's ``[file.cc:N]`` prefix, first sentence."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", line)
    line = line.split(". ")[0]
    return line if len(line) <= 200 else line[:197] + "..."


def is_unsupported_operation(error: BaseException) -> bool:
    """True for "this backend (or this torch) cannot do that" -- e.g. torch 2.1's gloo ``RuntimeError: no
    support for _allgather_base in Gloo process group``: a missing feature, not a lost peer."""
    text = str(error).lower()
    return isinstance(error, NotImplementedError) or any(sign in text for sign in _UNSUPPORTED_SIGNS)


def is_unsupported_backend_operation(error: BaseException) -> bool:
    """An unsupported operation that the process group's backend names (said in one line; any other
    unsupported operation, e.g. a missing dtype kernel, keeps its traceback)."""
    text = str(error).lower()
    return is_unsupported_operation(error) and any(name in text for name in _BACKEND_NAMES)


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a collective or the store raises when another rank is gone or stuck."""
    if is_unsupported_operation(error):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in _COLLECTIVE_SIGNS)


def group_timeout(default: float) -> float:
    """The default process group's timeout in seconds (``default`` when it cannot be read)."""
    try:
        group = dist.distributed_c10d._get_default_group()
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:
        return default


def silent_ranks(info, tag: str, wait_s: float) -> Tuple[Optional[List[int]], List[int]]:
    """After a failed collective: report it in the process group's store and wait up to ``wait_s``
    for the other ranks to report theirs. Returns (the ranks that did not report: crashed, killed or
    stuck; the ranks that had reported before this one). (None, []) when the store cannot tell."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = f"syncnorm/failure/{tag}/"
        others = [r for r in range(info.world_size) if r != info.rank]
        earlier = [r for r in others if store.check([key + str(r)])]
        store.set(key + str(info.rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in others if not store.check([key + str(r)])]
            if not missing or time.monotonic() >= deadline:
                return missing, earlier
            time.sleep(0.05)
    except Exception:
        return None, []


def describe_unsupported_operation(error: BaseException, info, state) -> str:
    """One line for an operation the backend or this torch version lacks (no rank is at fault)."""
    backend = f"the {info.backend} backend of " if info.backend else ""
    return (f"rank {info.rank}: an operation is not supported during {_where(state)} by {backend}torch "
            f"{torch.__version__} ({type(error).__name__}: {first_line(error)}); this is not a lost peer: use a "
            f"torch version this syncnorm supports (pyproject.toml's torch requirement) or another backend")


def _where(state) -> str:
    where = state.phase or "training"
    if state.epoch:
        where += f" at epoch {state.epoch}" + (f", step {state.step + 1}" if state.phase == "training step" else "")
    return where


def describe_collective_failure(error: BaseException, info, state, timeout_s: float, tag: str,
                                wait_s: float = 2.0, logs_dir: str = "") -> str:
    """One line for a failed collective: where it happened, the likely cause, the timeout, what to do.

    ``info`` is the rank's :class:`~syncnorm.train.distributed.DistInfo`, ``state`` the loop's
    :class:`~syncnorm.train.loop.LoopState` (phase, epoch, step); ``tag`` keeps one run's failure
    reports in the store apart from another's (see :func:`next_run_tag`); ``logs_dir`` is where the
    ranks' logs ``rank{N}.log`` are (named in the message)."""
    where = _where(state)
    logs = (lambda ranks: " " + ", ".join(os.path.join(logs_dir, f"rank{r}.log") for r in ranks)) if logs_dir \
        else (lambda ranks: "")
    missing, earlier = silent_ranks(info, tag, wait_s)
    timed_out = any(sign in str(error).lower() for sign in _TIMEOUT_SIGNS)
    how = (f"did not join the collective within dist.timeout_s={timeout_s:g}" if timed_out
           else "dropped its connection")
    if missing == [] and len(earlier) == info.world_size - 1:
        cause = (f"every other rank had already given up on this collective (after dist.timeout_s={timeout_s:g}) "
                 f"before this rank reached it: this rank was stuck or too slow before it; see the other "
                 f"ranks' messages")
    elif missing:
        names = ", ".join(str(r) for r in missing)
        cause = (f"rank{'s' if len(missing) > 1 else ''} {names} {how}: "
                 f"{'they' if len(missing) > 1 else 'it'} crashed, "
                 f"{'were' if len(missing) > 1 else 'was'} killed, or {'are' if len(missing) > 1 else 'is'} "
                 f"stuck before a collective (e.g. in data loading or a rank-dependent code path); see "
                 f"{'their' if len(missing) > 1 else 'its'} log{'s' if len(missing) > 1 else ''}{logs(missing)}")
    elif missing == []:
        cause = ("every rank failed in a collective here: the ranks call collectives in different orders "
                 "(a rank-dependent code path) or the network between them failed")
    else:
        cause = (f"another rank {how}: it crashed, was killed, or is stuck before a collective; see the "
                 f"other ranks' logs" + (f" in {logs_dir}" if logs_dir else ""))
    return f"rank {info.rank}: a collective failed during {where}: {cause} [{first_line(error)}]"


_runs = 0


def next_run_tag() -> str:
    """A tag for this process's next run, under which its ranks report a failure in the store (tests
    run several runs in one process group)."""
    global _runs
    _runs += 1
    return str(_runs)


def describe_join_failure(error: BaseException, stage: str, rank: int, world: int, store_address: str,
                          timeout_s: float, elapsed_s: float, backend: str = "gloo",
                          interface: Optional[str] = None) -> str:
    """One line for a failed join of the process group: how long it really took, the store address it
    tried, and which part failed. ``stage`` is ``"store"`` (no TCP connection to the rendezvous store
    at ``store_address``) or ``"group"`` (the store answered; then the ranks did not all arrive, or the
    backend could not connect them); ``interface`` is ``GLOO_SOCKET_IFNAME`` (None: unset)."""
    took = f"after {elapsed_s:.0f} s (dist.timeout_s={timeout_s:g})"
    text = str(error).lower()
    if stage == "store":
        cause = (f"could not reach the rendezvous store at {store_address} {took}: check that the node "
                 f"hosting it is up, the address, and that the port is open between the machines")
    elif "wait timeout" in text:  # the store answered, a peer's address never arrived in it
        cause = (f"reached the store at {store_address}, but not all {world} ranks joined {took}: a rank "
                 f"did not start or stopped before joining; see the other nodes' output")
    else:
        listens = f"interface {interface}" if interface else "the address this host's name resolves to"
        hint = ("a peer advertised a loopback address (its host name resolves to 127.x, or its "
                "GLOO_SOCKET_IFNAME is a loopback interface): set "
                "GLOO_SOCKET_IFNAME=<the interface that reaches the other nodes> on every node"
                if re.search(r"remote=\[(127\.|::1\])", text) else
                f"open {backend}'s ports between the machines (it listens on {listens}) or set "
                f"{backend.upper()}_SOCKET_IFNAME to the interface that reaches the other nodes")
        cause = f"reached the store at {store_address}, but {backend} could not connect its peers {took}: {hint}"
    return f"rank {rank}: joining the process group of {world} ranks failed: {cause} [{first_line(error)}]"
