"""Run a function on N ranks of a process group from one Python process: for tests and benchmarks.

The ranks join through a FileStore in a fresh temporary directory (no port). Nothing can hang: init and
every collective have a process-group timeout, the parent has a deadline for the whole run, and when a
rank fails the others get a short grace period and are then killed. Children come from a forkserver that
has imported torch once, so starting a group costs a fork, not an interpreter start; ``fn`` must be a
module-level function (it is pickled by name).
"""

import io
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta

import torch

from syncnorm._compat import destroy_process_group

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "syncnorm"])


class RankFailure(AssertionError):
    """One or more ranks raised, or did not finish in time."""


def _child(rank, world_size, store_path, pg_timeout, backend, threads, fn, args, results):
    import torch.distributed as dist

    # Ranks and gloo's own threads share the machine's cores: more intra-op threads per rank, or an
    # inter-op pool nothing here uses, only add contention.
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this (forked) process
        pass
    try:
        dist.init_process_group(backend, store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        if backend == "gloo":  # no rank leaves (or re-inits) while another still connects: "closed by peer"
            dist.barrier()
        try:
            value = fn(rank, world_size, *args)
        finally:
            destroy_process_group()
        buffer = io.BytesIO()
        torch.save(value, buffer)  # by value: a shared-memory tensor could die with this process
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size, *args, timeout=120.0, pg_timeout=30.0, grace=10.0, backend="gloo", threads=1):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks and return their results by rank (through
    ``torch.save``, so tensors come back whole). Raises one :class:`RankFailure` with every failed rank's
    traceback, labelled with its rank.

    Args:
        timeout: seconds the whole run may take before the parent kills every rank.
        pg_timeout: process-group timeout (init and each collective) inside the ranks.
        grace: seconds the other ranks get to finish after one rank failed.
        backend: process-group backend of the ranks.
        threads: torch intra-op threads per rank.
    """
    workdir = tempfile.mkdtemp(prefix="syncnorm-ranks-")
    results = _CONTEXT.Queue()
    store = os.path.join(workdir, "store")
    processes = [_CONTEXT.Process(target=_child, name=f"rank{rank}", daemon=True,
                                  args=(rank, world_size, store, pg_timeout, backend, threads, fn, args, results))
                 for rank in range(world_size)]
    outcome = {}
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        while len(outcome) < world_size and (remaining := deadline - time.monotonic()) > 0:
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if all(not p.is_alive() for r, p in enumerate(processes) if r not in outcome):
                    break  # every rank that has not reported died without a word
                continue
            outcome[rank] = (ok, payload)
            if not ok:
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        for process in processes:
            process.join(timeout=2.0 if len(outcome) == world_size else 0.1)
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        results.close()
        shutil.rmtree(workdir, ignore_errors=True)

    failures = []
    for rank, process in enumerate(processes):
        if rank not in outcome:
            failures.append(f"rank {rank}: no result (exit code {process.exitcode}); killed at the deadline")
        elif not outcome[rank][0]:
            failures.append(f"rank {rank} raised:\n{outcome[rank][1]}")
    if failures:
        raise RankFailure(f"{len(failures)} of {world_size} ranks failed\n\n" + "\n".join(failures))
    return [torch.load(io.BytesIO(outcome[rank][1]), weights_only=False) for rank in range(world_size)]
