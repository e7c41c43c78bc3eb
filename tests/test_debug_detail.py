"""TORCH_DISTRIBUTED_DEBUG=DETAIL makes a divergence against a collective that is not syncnorm's loud.

syncnorm checks its own collectives against each other (docs/semantics.md, 'When ranks diverge'), but it cannot
see a rank that went to another library's collective instead: a barrier, a user's all_reduce of a loss for
logging, DDP's gradient buckets. Without help the ranks wait for the process-group timeout (or gloo aborts).
With TORCH_DISTRIBUTED_DEBUG=DETAIL set before init_process_group, torch wraps the group so that every
collective first compares its kind and shapes across the ranks; these tests check that this works with synced
layers: every rank raises torch's "Detected mismatch between collectives" well before the timeout.

``run_ranks`` joins its ranks into a group before the test function runs (and its forkserver read the debug
level when it imported torch.distributed), so each rank here sets the variable, re-reads it and joins a new
group through its own FileStore, as a user's script with the variable in its environment would.
"""

import os
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import syncnorm
from syncnorm.testing import run_ranks

# Short: a divergence DETAIL failed to see would end in a timeout error, which the test tells apart from
# DETAIL's mismatch error (and the run never waits longer than this).
PG_TIMEOUT_S = 20
MISMATCH = "Detected mismatch between collectives"
TROUBLESHOOTING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "troubleshooting.md")


def _join_with_detail(rank, world_size, store_path):
    """Leave run_ranks' group and join a new one with TORCH_DISTRIBUTED_DEBUG=DETAIL set before the init."""
    dist.destroy_process_group()
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    dist.set_debug_level_from_env()  # what importing torch.distributed does with the variable set
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))


def _diverge(rank, world_size, case, store_path):
    _join_with_detail(rank, world_size, store_path)
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), syncnorm.SyncBatchNorm(4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    model(x).square().mean().backward()  # one agreeing step: DETAIL lets it through
    loss = torch.tensor([1.0 + rank], dtype=torch.float64)
    started = time.monotonic()
    try:
        if case == "barrier":  # rank 1 waits in a barrier while rank 0 is in the synced layer's forward gather
            model(x) if rank == 0 else dist.barrier()
        elif case == "all_reduce":  # rank 0 logs its loss (all_reduce) while rank 1 runs a synced layer
            dist.all_reduce(loss) if rank == 0 else model(x)
        else:
            raise AssertionError(f"unknown case {case}")
    except Exception as error:  # noqa: BLE001 -- the error is the result
        return {"raised": type(error).__name__, "message": str(error), "seconds": time.monotonic() - started}
    return {"raised": None, "message": "", "seconds": time.monotonic() - started}


@pytest.mark.parametrize("case", ["barrier", "all_reduce"])
def test_detail_turns_a_foreign_collective_into_an_error_on_every_rank(case, tmp_path):
    results = run_ranks(_diverge, 2, case, str(tmp_path / "store"), timeout=3 * PG_TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["raised"] is not None, f"rank {rank} went on past the divergence: {result}"
        # torch's message, naming both ranks' collectives (kind, shapes, dtypes), not a timeout
        assert MISMATCH in result["message"], f"rank {rank} raised something else: {result}"
        # ...and which collective each rank is in (torch decodes the other rank's kind loosely: rank 0 in the
        # layer's gather may read rank 1's barrier as REDUCE, rank 1 reads the gather as GATHER)
        assert "Op type:" in result["message"] and "GATHER" in result["message"], result["message"]
        assert result["seconds"] < PG_TIMEOUT_S, f"rank {rank} raised only at the timeout: {result}"
    # docs/troubleshooting.md ('A hang') shows what each rank printed: the same as now
    with open(TROUBLESHOOTING, encoding="utf-8") as f:
        shown = [line.rstrip() for line in f if line.startswith(f"{case}, rank ")]
    printed = [_doc_line(case, rank, result) for rank, result in enumerate(results)]
    assert shown == printed, f"docs/troubleshooting.md shows other messages than the ranks print now:\n" + "\n".join(printed)


def _doc_line(case, rank, result):
    """How docs/troubleshooting.md shows one rank's error (trailing blanks of torch's message dropped)."""
    return f"{case}, rank {rank}: {result['raised']}: {result['message']}".rstrip()
