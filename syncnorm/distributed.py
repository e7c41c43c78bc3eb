"""The process group from the launcher's environment: torchrun's variables, or SLURM's under ``srun``.

:func:`init_from_env` is the one call a training script needs under either launcher (``torchrun ...
train.py`` or ``srun python train.py``); :func:`torchrun_environment` turns SLURM's variables into
torchrun's, so code written for torchrun runs unchanged (which variable comes from where, and what wins:
docs/multinode.md#slurm). :func:`sync_groups` builds the process groups of consecutive ranks (e.g. one per
node) that synced layers can sync within instead of across all ranks.
"""

import os
import re
import shutil
import socket
import subprocess
from datetime import timedelta
from itertools import product
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["LaunchEnvironmentError", "expand_hostlist", "init_from_env", "slurm_port", "sync_groups",
           "torchrun_environment"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Slurm's step ids above this are not srun task steps: batch (0xfffffffb), extern, interactive (salloc).
_LAST_TASK_STEP = 0xFFFFFFF0


class LaunchEnvironmentError(RuntimeError):
    """The environment names a launcher (SLURM) but does not describe this process's place in a group."""


def expand_hostlist(text: str) -> List[str]:
    """Slurm's host list notation, expanded: ``"node[01-03,7],gpu1"`` -> node01, node02, node03, node7, gpu1.

    Zero padding is kept; several bracket groups in one name multiply (``r[1-2]c[1-2]``), as in
    ``scontrol show hostnames``."""
    hosts: List[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text):
        parts = re.split(r"\[([^\]]*)\]", name)  # text, range, text, range, ..., text
        choices = [[part] if index % 2 == 0 else _expand_ranges(part, text) for index, part in enumerate(parts)]
        hosts.extend("".join(combination) for combination in product(*choices))
    return hosts


def _expand_ranges(ranges: str, text: str) -> List[str]:
    values = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise LaunchEnvironmentError(f"SLURM node list {text!r}: expected ranges like [01-03,7] (got [{ranges}])")
        width = len(low) if low.startswith("0") else 0
        values += [str(number).zfill(width) for number in range(int(low), int(high or low) + 1)]
    return values


def slurm_port(job_id: str) -> int:
    """The store's port for SLURM job ``job_id``: 15000 + the job id modulo 10000, below Linux's
    ephemeral ports (32768 and up), and another one for the next job on the same nodes."""
    return 15000 + int(job_id) % 10000


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.strip().isdigit():
        raise LaunchEnvironmentError(f"environment variable {name}: expected an integer (got {value!r}); "
                                     f"is this process one of srun's tasks?")
    return int(value)


def _tasks_on_node(tasks_per_node: str, node: int) -> Optional[int]:
    """Tasks on step node ``node`` from ``SLURM_STEP_TASKS_PER_NODE`` (``"2(x3),1"``), None if unreadable."""
    counts: List[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def in_slurm_task(env: Mapping[str, str]) -> bool:
    """True in a task that ``srun`` started (a job step with a task id), not in a batch script or salloc shell."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return "SLURM_PROCID" in env and step.isdigit() and int(step) < _LAST_TASK_STEP


def torchrun_environment(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """torchrun's variables that SLURM's describe, or ``{}`` when there is nothing to add.

    ``{}`` when torchrun's own variables are set (they win), outside SLURM, or in a SLURM job of one task
    that ``srun`` did not start (a batch script running ``python train.py``). Otherwise ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Raises :class:`LaunchEnvironmentError` when the job has several tasks but ``srun`` did not start this
    process, or the first node's name does not resolve and ``scontrol`` does not know its address.
    """
    env = os.environ if environ is None else environ
    if any(env.get(name, "") != "" for name in TORCHRUN_VARIABLES) or "SLURM_JOB_ID" not in env:
        return {}
    if not in_slurm_task(env):
        tasks = env.get("SLURM_NTASKS", "1")
        if tasks.isdigit() and int(tasks) <= 1:
            return {}
        raise LaunchEnvironmentError(
            f"SLURM job {env['SLURM_JOB_ID']} has {tasks} tasks, but this process was not started by srun (no "
            f"SLURM_STEP_ID: a batch script or salloc shell): run it as srun python ..., which starts one "
            f"process per task, or srun torchrun ... (one task per node), or ask for --ntasks=1")
    rank, world, node = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_NODEID")
    local_rank = _int(env, "SLURM_LOCALID")
    local_world = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), node) or local_rank + 1
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if not nodes:
        raise LaunchEnvironmentError("SLURM task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: set MASTER_ADDR "
                                     "to the first node's address")
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": str(node),
            "MASTER_ADDR": env.get("MASTER_ADDR") or node_address(expand_hostlist(nodes)[0], env),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env["SLURM_JOB_ID"]))}


def node_address(name: str, env: Mapping[str, str]) -> str:
    """``name`` when it resolves here, else its ``NodeAddr`` from ``scontrol show node`` (clusters whose
    node names are not host names)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except (OSError, UnicodeError):
        pass
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol:
        try:
            shown = subprocess.run([scontrol, "-o", "show", "node", name], capture_output=True, text=True,
                                   timeout=30, env=dict(env)).stdout
        except (OSError, subprocess.SubprocessError):
            shown = ""
        match = re.search(r"\bNodeAddr=(\S+)", shown)
        if match:
            return match.group(1)
    raise LaunchEnvironmentError(f"SLURM's first node {name!r} hosts rank 0's store, but its name does not resolve "
                                 f"here and scontrol show node {name} gives no NodeAddr: set MASTER_ADDR to its "
                                 f"address (srun passes the environment on)")


def init_from_env(backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> bool:
    """Initialize the default process group from torchrun's or SLURM's environment; all ranks call this.

    Does nothing when a process group already exists (Ray Train, Lightning, a test harness) or when
    no launcher describes one (a plain ``python train.py``). Under ``srun`` without torchrun, SLURM's
    variables are turned into torchrun's (:func:`torchrun_environment`) and written to ``os.environ``,
    so later code that reads ``LOCAL_RANK`` finds it. Where this host's name resolves to a loopback
    address (Debian's ``127.0.1.1``) and the ranks span machines, set ``GLOO_SOCKET_IFNAME`` to the
    interface that reaches the other nodes (``launch/train.py`` picks it itself).

    Args:
        backend: default ``"nccl"`` when CUDA is available, else ``"gloo"``. With ``"nccl"`` the current
            CUDA device becomes ``LOCAL_RANK``.
        timeout: the process group's timeout; default: torch's.

    Returns:
        ``True`` when this call created the group (the caller destroys it at the end), else ``False``.
    """
    if dist.is_initialized():
        return False
    os.environ.update(torchrun_environment())
    if any(os.environ.get(name, "") == "" for name in ("RANK", "WORLD_SIZE")):
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return True


def sync_groups(group_size: int):
    """The process group of this rank's ``k = group_size`` consecutive ranks (``0 .. k-1``, ``k .. 2k-1``,
    ...), for synced layers that should sync within a node instead of across all ranks: pass it as
    ``process_group``. All ranks must call this, once, in the same order (every group is created on every
    rank). Each group keeps its own running statistics, so turn DDP's buffer broadcast off
    (docs/semantics.md#syncing-within-groups-of-ranks).

    Returns the default group when ``group_size`` equals the world size, and ``None`` ("all ranks", here
    one) when ``torch.distributed`` is not initialized and ``group_size`` is 1. Raises ``ValueError`` when
    ``group_size`` is not an integer ``>= 1`` dividing the world size.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"sync_groups: expected group_size to be an integer >= 1 (got {group_size!r})")
    if not (dist.is_available() and dist.is_initialized()):
        if group_size != 1:
            raise ValueError(f"sync_groups: expected group_size=1 without a process group, as there is one "
                             f"process (got {group_size}); initialize torch.distributed first")
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % group_size:
        divisors = [k for k in range(1, world + 1) if world % k == 0]
        raise ValueError(f"sync_groups: expected group_size to divide the world size {world} (got {group_size}); "
                         f"use one of {', '.join(map(str, divisors))}")
    if group_size == world:
        return dist.group.WORLD
    groups = [dist.new_group(list(range(start, start + group_size))) for start in range(0, world, group_size)]
    return groups[rank // group_size]
