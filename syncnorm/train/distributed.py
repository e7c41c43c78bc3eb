"""The process group from torchrun's environment, and the small helpers that work without one.

Every launcher ends here: torchrun sets ``RANK``, ``WORLD_SIZE``, ... itself; under ``srun`` without
torchrun, :func:`syncnorm.train.preflight.check_launch_environment` has written the same variables
from SLURM's (:func:`syncnorm.distributed.torchrun_environment`, which ``init_from_env`` uses too).
:func:`setup_distributed` joins the group those variables describe, or
returns a one-process :class:`DistInfo` for a plain ``python launch/train.py``; every helper here
(:func:`all_sum`, :func:`broadcast_buffers`, :func:`wrap_ddp`) gives the one-process answer when
``world_size == 1``, so callers never test for it.
"""

import inspect
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from syncnorm.train.errors import CollectiveError, ConfigError
from syncnorm.train.failures import describe_join_failure, is_collective_failure
from syncnorm.train.models import has_sync_batchnorm
from syncnorm.train.network import apply_gloo_interface

# DDP's switch for the per-forward buffer broadcast: torch 2.14 renamed broadcast_buffers.
DDP_BUFFER_SYNC = ("forward_sync_buffers"
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    owns_group: bool  # True when this module initialized the process group (and must destroy it)


def choose_backend(requested: str) -> str:
    """``auto`` -> ``nccl`` when this process has a CUDA device, else ``gloo``."""
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise ConfigError("dist.backend: expected auto or gloo on a machine without CUDA (got 'nccl')")
    return requested


def env_int(name: str, default: int) -> int:
    """An integer environment variable (``default`` when unset or empty)."""
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer (got {value!r})") from None


def setup_distributed(cfg) -> DistInfo:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (a plain ``python launch/train.py``) the run is one process with no group.
    If a group already exists (tests), it is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
        local_rank = env_int("LOCAL_RANK", rank)
        local_world = env_int("LOCAL_WORLD_SIZE", world)
        owns = False
    else:
        world = env_int("WORLD_SIZE", 1)
        rank = env_int("RANK", 0)
        local_rank = env_int("LOCAL_RANK", 0)
        local_world = env_int("LOCAL_WORLD_SIZE", world)
        backend = choose_backend(cfg.dist.backend)
        owns = world > 1
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if owns:
            apply_gloo_interface(backend, world, local_world, local_rank)
            started = time.monotonic()
            try:
                init_group(backend, rank, world, timedelta(seconds=cfg.dist.timeout_s), local_world)
            except Exception as error:
                stage, error = (error.stage, error.cause) if isinstance(error, JoinError) else ("group", error)
                if not is_collective_failure(error):
                    raise error from None
                store = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise CollectiveError(describe_join_failure(
                    error, stage, rank, world, store, cfg.dist.timeout_s, time.monotonic() - started,
                    str(backend), os.environ.get("GLOO_SOCKET_IFNAME"))) from None
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, str(backend), device, owns)


def init_group(backend: str, rank: int, world: int, timeout: timedelta, local_world: int = 0) -> None:
    """``init_process_group`` from torchrun's environment.

    Gloo's interface (``GLOO_SOCKET_IFNAME``) is chosen before, by
    :func:`syncnorm.train.network.apply_gloo_interface`. A failure raises :class:`JoinError`, which
    says whether the store or the backend's connections failed.

    Under torchrun with the c10d rendezvous the agent hosts one TCPStore for the workers and keeps it
    across restarts (pytorch/pytorch#135712), so restarted workers can read the previous attempt's keys
    -- e.g. gloo's peer addresses, whose sockets died with the old workers ("Connection refused" at
    init, and the restart is lost). Keys get a per-attempt prefix here (torchrun restarts the whole
    worker group, so every rank has the same ``TORCHELASTIC_RESTART_COUNT``).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and attempt is not None:
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
        except Exception as error:
            raise JoinError("store", error) from error
        store = dist.PrefixStore(f"syncnorm/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        try:
            dist.init_process_group(backend, timeout=timeout)
        except Exception as error:  # env://: the store is created inside; its errors name it
            text = str(error).lower()
            store_failed = "gloo" not in text and (isinstance(error, getattr(dist, "DistNetworkError", ()))
                                                   or "tcpstore" in text or "client socket" in text)
            raise JoinError("store" if store_failed else "group", error) from error


class JoinError(Exception):
    """:func:`init_group` failed; ``stage`` says where: ``"store"`` (reaching the rendezvous store) or
    ``"group"`` (the backend connecting the ranks), ``cause`` is the original error."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(str(cause))
        self.stage, self.cause = stage, cause


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads(local_world_size: int) -> int:
    """The default ``dist.threads``: this rank's share of the cores; one process leaves one core free.

    Measured (LeNet on mnist5k, one process, 2 cores shared with other work, load 3-7): 1 thread
    trained at 1,250-6,600 samples/s, 2 threads at 135-245 (an OpenMP thread that spins waiting for
    a busy core stalls every op), so one process no longer takes every core."""
    cores = usable_cores()
    if local_world_size <= 1:
        return max(1, cores - 1)
    return max(1, cores // local_world_size)


def threads_text(configured: int) -> str:
    """How the thread count was chosen, for the start-up lines."""
    if configured:
        return "dist.threads"
    local = env_int("LOCAL_WORLD_SIZE", 1)
    if torch.get_num_threads() != default_threads(local):
        return "set before the run, not by the launcher"
    rule = "cores - 1" if local <= 1 else f"cores / {local} local ranks"
    return f"default: {rule}, {usable_cores()} cores; set dist.threads"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def all_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``values`` element-wise over all ranks (one all_reduce; a no-op in one process)."""
    if info.world_size > 1:
        dist.all_reduce(values)
    return values


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (running statistics) so all ranks evaluate the saved model."""
    if info.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def expected_rank() -> tuple:
    """(rank, world size) before :func:`setup_distributed`: the existing group's, else torchrun's
    environment's (0, 1 for one plain process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return env_int("RANK", 0), env_int("WORLD_SIZE", 1)


def one_process() -> DistInfo:
    """The :class:`DistInfo` of a plain one-process CPU run (no process group)."""
    return DistInfo(0, 1, 0, 1, "", torch.device("cpu"), False)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` in :class:`DistributedDataParallel` over the process group (``model`` itself in one process)."""
    if info.world_size == 1:
        return model
    ddp_kwargs = {"device_ids": [info.local_rank]} if info.device.type == "cuda" else {}
    # Synced BatchNorm leaves bit-identical running statistics on every rank, so DDP's broadcast of
    # rank 0's buffers before every forward would be one more collective per step for nothing.
    ddp_kwargs[DDP_BUFFER_SYNC] = not has_sync_batchnorm(model)
    return DistributedDataParallel(model, **ddp_kwargs)
