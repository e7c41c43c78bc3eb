"""Start a benchmark on N CPU ranks (gloo), either by spawning them or under ``torchrun``.

Usage from a benchmark script::

    from _launch import launch

    def body(rank, world_size, args):      # module-level: spawned ranks import it by name
        ...                                # runs on every rank inside an initialized process group
        return something                   # only rank 0's value is handed back

    if __name__ == "__main__":
        result = launch(body, args.world_size, args)   # rank 0's return value, or None on other ranks
        if result is not None:
            print(result)

* Plain ``python benchmarks/x.py``: starts ``world_size`` processes with ``syncnorm.testing.run_ranks``
  (a gloo group through a FileStore in a fresh temporary directory, no port needed) and returns rank
  0's value in the parent.
* ``torchrun --nproc-per-node N benchmarks/x.py``: each torchrun worker joins the group from the
  ``env://`` variables and runs ``body`` in place; ``launch`` returns the value on rank 0 and None on
  the others, so the caller's "print on rank 0" logic is the same in both modes.

Every rank runs with ``threads`` intra-op threads (default 1: ranks and gloo's own threads share the
machine's cores, and more threads per rank only add contention), and a process-group timeout so a
crashed peer ends the run instead of hanging it.
"""

import os
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from syncnorm.testing import RankFailure, run_ranks


class LaunchError(RuntimeError):
    """A rank raised, or the run passed its deadline."""


def under_torchrun() -> bool:
    """True when this process is a torchrun (or other ``env://``) worker."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_rank0() -> bool:
    """True on rank 0 of the current process group (or when there is none)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _setup(threads: int) -> None:
    torch.set_num_threads(threads)
    # Keep the inter-op pool small too: nothing here uses it, and its threads compete for the cores.
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or work already started in this process
        pass


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    timeout: float = 1800.0,
    pg_timeout: float = 120.0,
) -> Optional[Any]:
    """Run ``fn(rank, world_size, *args)`` on every rank; return rank 0's value (None on other ranks).

    Under torchrun ``world_size`` is taken from the environment (a mismatch with the requested one is
    reported, not fatal). ``fn``'s return value must be picklable; only rank 0's is sent back.
    """
    if under_torchrun():
        _setup(threads)
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world_size and rank == 0:
            print(f"note: torchrun started {size} ranks; using that instead of {world_size}")
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=pg_timeout))
        try:
            value = fn(rank, size, *args)
        finally:
            dist.destroy_process_group()
        return value if rank == 0 else None
    return _spawn(fn, world_size, args, backend, threads, timeout, pg_timeout)


def _spawn(fn, world_size, args, backend, threads, timeout, pg_timeout):
    # The same harness the tests use: forkserver ranks, FileStore rendezvous, deadlines, tracebacks.
    try:
        results = run_ranks(fn, world_size, *args, timeout=timeout, pg_timeout=pg_timeout, backend=backend,
                            threads=threads)
    except RankFailure as failure:
        raise LaunchError(str(failure)) from None
    return results[0]


BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
COMMITTED_RESULTS = os.path.join(BENCHMARKS, "results")
# Ordinary runs write here (ignored by git); --update-results refreshes the committed files instead.
SCRATCH_RESULTS = os.path.join(os.path.dirname(BENCHMARKS), "runs", "benchmarks")


def results_path(name: str, update_results: bool) -> str:
    """Output path (without extension) for the results called ``name``."""
    return os.path.join(COMMITTED_RESULTS if update_results else SCRATCH_RESULTS, name)

