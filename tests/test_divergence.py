"""Ranks that walk different paths through the synced layers raise one clear error on every rank.

Each synced collective carries the layer's identity (its qualified name from convert_sync_batchnorm,
and the phase): two layers of the same width called in another order, or a layer one rank skips, must
make every rank raise ``ValueError`` naming the layers at the next collective, long before the
process-group timeout (10 s here: a rank that waits that long fails the test with a timeout error,
not the expected message).
"""

import time

import pytest
import torch
from torch import nn

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
    # One step on the same path first (a layer skipped at its first call: test_a_layer_skipped_...).
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


# Legitimate uses that must not trip the identity check (issue 27): each rank's part of a two-step run
# against torch's BatchNorm on the concatenated global batch in one process.
SIZES = [2, 3, 4]


class SharedLayer(nn.Module):
    """One BatchNorm registered under two parents, the parents registered in a per-rank order (as from a
    set or a dict), then a second BatchNorm."""

    def __init__(self, order) -> None:
        super().__init__()
        shared = nn.BatchNorm1d(3)
        for name in order:
            self.add_module(name, nn.Sequential(shared))
        self.last = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.last(self.p(x))


def _legit_model(case, rank, reference=False):
    if case == "shared layer":
        model = SharedLayer(["q", "p"] if rank % 2 else ["p", "q"]).double()
        return model if reference else syncnorm.convert_sync_batchnorm(model)
    if reference:
        return nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)).double()
    model = syncnorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))).double()
    if rank == 0:  # a walk on one rank only builds throwaway synced layers there
        if case == "revert on rank 0":
            syncnorm.revert_sync_batchnorm(model)  # the README's export snippet
        else:
            syncnorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(5)))
    return nn.Sequential(*model, syncnorm.SyncBatchNorm(3).double())  # a layer built directly afterwards


def _global_batches(world_size):
    generator = torch.Generator().manual_seed(0)
    total = sum(SIZES[:world_size])
    return [(torch.randn(total, 3, generator=generator, dtype=torch.float64) * 2 + 1,
             torch.randn(total, 3, generator=generator, dtype=torch.float64)) for _ in range(2)]


def _train_two_steps(model, batches):
    results = []
    for x, grad in batches:
        x = x.clone().requires_grad_()
        y = model(x)
        y.backward(grad)
        results += [y.detach(), x.grad]
    return results + [buffer.clone() for buffer in model.buffers()]


def _legit_on_rank(rank, world_size, case):
    start = sum(SIZES[:rank])
    part = slice(start, start + SIZES[rank])
    return _train_two_steps(_legit_model(case, rank), [(x[part], g[part]) for x, g in _global_batches(world_size)])


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", ["shared layer", "revert on rank 0", "convert on rank 0"])
def test_throwaway_layers_and_shared_layers_keep_every_ranks_identities(case, world_size):
    per_rank = run_ranks(_legit_on_rank, world_size, case, timeout=120.0, pg_timeout=PG_TIMEOUT)
    expected = _train_two_steps(_legit_model(case, 0, reference=True), _global_batches(world_size))
    for rank, results in enumerate(per_rank):
        start = sum(SIZES[:rank])
        for index, (got, want) in enumerate(zip(results, expected)):
            if index < 4:  # outputs and input gradients: this rank's rows
                want = want[start : start + SIZES[rank]]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"rank {rank}, item {index}")


# Where syncnorm's own collectives meet (issue 27): a layer skipped at its first call, or one of another
# width, used to meet the one-time channel-count gather (hang, or gloo aborting the process); layers on
# two groups of the same ranks waited in two queues.
class Widths(nn.Module):
    """Two synced layers fed separate inputs: 'a' of 3 channels, 'b' of ``width_b``."""

    def __init__(self, width_b) -> None:
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(width_b)

    def forward(self, inputs, order):
        return sum(getattr(self, name)(inputs[name]).sum() for name in order)


def _skip_a_layer(rank, world_size, width_b, before):
    model = syncnorm.convert_sync_batchnorm(Widths(width_b).double())
    inputs = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(4, width_b, dtype=torch.float64)}
    if before:  # a step that every rank takes first
        model(inputs, before).backward()
    try:
        model(inputs, ["a", "b"] if rank == 0 else ["b"]).backward()
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("width_b,before", [(3, ["b"]), (5, []), (5, ["a", "b"])],
                         ids=["first call", "first call, other width", "other width"])
def test_a_layer_skipped_at_its_first_call_or_of_another_width_raises_on_every_rank(width_b, before, world_size):
    # Rank 0 calls 'a' then 'b', the others only 'b'; 'a' is at its first call in the first two cases.
    messages = run_ranks(_skip_a_layer, world_size, width_b, before, timeout=120.0, pg_timeout=PG_TIMEOUT)
    for rank, message in enumerate(messages):
        assert DIVERGED in message, (rank, message)
    assert "rank 0: 'a' (forward)" in messages[0] and "rank 1: 'b' (forward)" in messages[0], messages[0]


def _two_groups_of_the_same_ranks(rank, world_size):
    first = torch.distributed.new_group(list(range(world_size)))
    second = torch.distributed.new_group(list(range(world_size)))
    a = syncnorm.SyncBatchNorm(3, process_group=first).double()
    b = syncnorm.SyncBatchNorm(3, process_group=second).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    try:
        for layer in ([a, b] if rank == 0 else [b, a]):
            layer(x)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_layers_on_two_groups_of_the_same_ranks_called_in_another_order_raise_on_every_rank(world_size):
    messages = run_ranks(_two_groups_of_the_same_ranks, world_size, timeout=120.0, pg_timeout=PG_TIMEOUT)
    for rank, message in enumerate(messages):
        assert DIVERGED in message and "in construction order" in message, (rank, message)


# Waits in synced collectives of different groups (issue 27, case 7): no packet of one rank reaches the
# other, so only the deadlock watch in comm.py can tell. Layers: 'sub' on ranks {0, 1}, 'other' on another
# group of the same ranks, 'all' on every rank. PG_TIMEOUT bounds the wait: a rank that is not told within it
# gets gloo's timeout error instead of this message.
WAIT_CYCLE = "the ranks wait for each other in synced collectives of different process groups"


class Groups(nn.Module):
    def __init__(self, groups) -> None:
        super().__init__()
        self.sub, self.other, self.all = (nn.BatchNorm1d(3) if group != "none" else nn.Identity()
                                          for group in groups)

    def forward(self, x, order):
        return sum(getattr(self, name)(x).sum() for name in order)


def _subgroup_waits(rank, world_size, orders):
    sub, other = torch.distributed.new_group([0, 1]), torch.distributed.new_group([0, 1])
    model = Groups(["sub", "other", "all"] if rank < 2 else ["none", "none", "all"]).double()
    for name, group in [("sub", sub), ("other", other)]:
        if rank < 2:
            model.add_module(name, syncnorm.convert_sync_batchnorm(getattr(model, name), process_group=group))
    model = syncnorm.convert_sync_batchnorm(model)
    torch.distributed.barrier()  # every rank's groups are connected before any rank can leave
    try:
        model(torch.randn(4, 3, dtype=torch.float64), orders[min(rank, len(orders) - 1)]).backward()
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("world_size", [3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("orders", [
    [["sub", "all"], ["all"]],  # rank 1 skips the subgroup layer
    [["sub", "other", "all"], ["other", "sub", "all"], ["all"]],  # two groups of ranks {0, 1}, in another order
], ids=["subgroup layer skipped", "two subgroups of the same ranks"])
def test_ranks_waiting_in_synced_collectives_of_different_groups_all_raise(orders, world_size):
    messages = run_ranks(_subgroup_waits, world_size, orders, timeout=120.0, pg_timeout=PG_TIMEOUT)
    for rank, message in enumerate(messages):
        assert WAIT_CYCLE in message, (rank, message)
    first, second = orders[0][0], orders[1][0]
    assert (f"rank 0 waits in '{first}' (forward) over ranks [0, 1]" in messages[0]
            and f"rank 1 waits in '{second}' (forward)" in messages[0]), messages[0]


def _slow_member(rank, world_size):
    # Ranks {0, 1} sync layer 'sub', ranks {1, 2} layer 'other'; rank 1 calls 'other' first, and rank 2 comes
    # late, so rank 0 waits for rank 1, which waits in another group for rank 2: a chain, not a cycle.
    syncnorm.comm.STALL_SECONDS = 0.1
    groups = {"sub": torch.distributed.new_group([0, 1]), "other": torch.distributed.new_group([1, 2])}
    mine = {0: ["sub"], 1: ["other", "sub"], 2: ["other"]}[rank]
    layers = nn.ModuleDict({name: syncnorm.convert_sync_batchnorm(nn.BatchNorm1d(3), process_group=groups[name])
                            for name in mine})
    layers = syncnorm.convert_sync_batchnorm(layers).double()  # named by path: 'sub', 'other'
    torch.distributed.barrier()
    if rank == 2:
        time.sleep(2.0)
    x = _chunk(rank)
    return {name: layers[name](x) for name in mine}


def _chunk(rank):
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(rank), dtype=torch.float64) * (rank + 1)


def test_a_slow_rank_behind_another_group_is_waited_for():
    outputs = run_ranks(_slow_member, 3, timeout=120.0, pg_timeout=PG_TIMEOUT)
    for name, ranks in [("sub", [0, 1]), ("other", [1, 2])]:
        expected = nn.BatchNorm1d(3).double()(torch.cat([_chunk(rank) for rank in ranks])).detach()
        for index, rank in enumerate(ranks):
            torch.testing.assert_close(outputs[rank][name].detach(), expected[4 * index : 4 * index + 4],
                                       rtol=1e-12, atol=1e-12, msg=f"{name}, rank {rank}")
