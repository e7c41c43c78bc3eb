"""Ranks that walk different paths through the synced layers raise one clear error on every rank.

Each synced collective carries the layer's identity (its qualified name from convert_sync_batchnorm,
and the phase): two layers of the same width called in another order, or a layer one rank skips, must
make every rank raise ``ValueError`` naming the layers at the next collective, long before the
process-group timeout (10 s here: a rank that waits that long fails the test with a timeout error,
not the expected message). A recompute that sees another input on one rank only raises on every rank.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import syncnorm
from syncnorm.testing import run_ranks

PG_TIMEOUT = 10.0
DIVERGED = "the ranks reached different synced layers in the same collective"


class Two(nn.Module):
    """Two synced layers of the same width, called in an order (or subset) chosen per rank."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm1d(3)
        self.b = nn.BatchNorm1d(3)

    def forward(self, x, order):
        for name in order:
            x = getattr(self, name)(x)
        return x


def _diverge(rank, world_size, orders):
    torch.manual_seed(rank)
    model = syncnorm.convert_sync_batchnorm(Two().double())
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    # One step on the same path first: a layer's first synced call also checks the channel count
    # across ranks, a collective of another size, which gloo cannot pair with a statistics packet.
    model(x, ["a", "b"]).sum().backward()
    try:
        model(x, orders[rank] if rank < len(orders) else orders[-1]).sum().backward()
    except ValueError as error:
        return str(error)
    return "no error"


CASES = {
    # rank 0's order, rank 1's (and every further rank's), what each rank's message names
    "other order": (["a", "b"], ["b", "a"]),
    "first skipped": (["a", "b"], ["b"]),
    "last skipped": (["a", "b"], ["a"]),  # rank 1 is in its backward while rank 0 gathers for 'b'
}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_that_call_other_synced_layers_all_raise_naming_the_layers(case, world_size):
    messages = run_ranks(_diverge, world_size, CASES[case], timeout=120.0, pg_timeout=PG_TIMEOUT)
    for rank, message in enumerate(messages):
        assert DIVERGED in message, (rank, message)
        assert "'a'" in message or "'b'" in message, (rank, message)
    # Forward gathers show every rank's layer: rank 0 names what each rank reached.
    if case != "last skipped":
        assert "rank 0: 'a' (forward)" in messages[0] and "rank 1: 'b' (forward)" in messages[0], messages[0]
    else:
        assert "rank 0: 'b' (forward)" in messages[0] and "rank 1: 'a' (backward)" in messages[0], messages[0]


def _diverge_on_device_path(rank, world_size, backward):
    # The path CUDA tensors and compiled graphs take, run eagerly on CPU: asserts with a static message
    # (on CPU torch._assert_async raises at once; on CUDA it fails the stream).
    syncnorm.functional._HOST_READS = False
    model = syncnorm.convert_sync_batchnorm(Two().double())
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    model(x, ["a", "b"]).sum().backward()
    order = (["a", "b"] if rank == 0 else ["a"]) if backward else (["a", "b"] if rank == 0 else ["b", "a"])
    try:
        model(x, order).sum().backward()
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("backward", [False, True], ids=["forward gather", "backward sum"])
def test_the_device_path_asserts_on_every_rank(backward):
    for rank, message in enumerate(run_ranks(_diverge_on_device_path, 2, backward, timeout=120.0,
                                             pg_timeout=PG_TIMEOUT)):
        assert DIVERGED in message, (rank, message)


def _same_path(rank, world_size):
    model = syncnorm.convert_sync_batchnorm(Two().double())
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    model(x, ["a", "b", "a"]).sum().backward()  # a layer called twice is the same layer both times
    return model.a.running_mean


def test_the_same_path_on_every_rank_passes_the_check():
    means = run_ranks(_same_path, 3, timeout=120.0, pg_timeout=PG_TIMEOUT)
    assert all(torch.equal(means[0], mean) for mean in means)


def _directly_built(rank, world_size):
    # Layers built directly (not converted) are told apart by construction order.
    first, second = syncnorm.SyncBatchNorm(3).double(), syncnorm.SyncBatchNorm(3).double()
    layers = [first, second] if rank == 0 else [second, first]
    x = torch.randn(4, 3, dtype=torch.float64)
    try:
        layers[0](x)
    except ValueError as error:
        return str(error)
    return "no error"


def test_directly_built_layers_called_in_another_order_raise():
    for rank, message in enumerate(run_ranks(_directly_built, 2, timeout=120.0, pg_timeout=PG_TIMEOUT)):
        assert DIVERGED in message and "in construction order" in message, (rank, message)


def _recompute_differs_on_rank_0(rank, world_size, use_reentrant, input_grad):
    torch.manual_seed(1)
    layer = syncnorm.SyncBatchNorm(3).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=input_grad)
    noisy = lambda x: layer(F.dropout(x, 0.5))  # noqa: E731
    # Rank 0 does not preserve the random state: its recompute draws another dropout mask.
    y = checkpoint(noisy, x, use_reentrant=use_reentrant, preserve_rng_state=rank != 0)
    try:
        y.pow(2).sum().backward()
    except Exception as error:  # non-reentrant: raised from inside the saved tensor's unpack
        return f"{type(error).__name__}: {error}", layer.num_batches_tracked.item()
    return "no error", layer.num_batches_tracked.item()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("use_reentrant,input_grad", [(True, True), (False, True), (False, False)],
                         ids=["reentrant", "non-reentrant", "non-reentrant, input without gradient"])
def test_a_recompute_that_sees_another_input_on_one_rank_raises_on_every_rank(use_reentrant, input_grad, world_size):
    results = run_ranks(_recompute_differs_on_rank_0, world_size, use_reentrant, input_grad,
                        timeout=120.0, pg_timeout=PG_TIMEOUT)
    for rank, (message, steps) in enumerate(results):
        assert "ValueError: SyncBatchNorm expected a recomputed forward" in message, (rank, message)
        assert ("this rank included" if rank == 0 else "not this rank") in message, (rank, message)
        assert steps == 1, (rank, steps)
