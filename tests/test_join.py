"""syncnorm.join: ranks with different numbers of batches train exactly as one process that runs, at each
step, BatchNorm on the concatenation of the batches of the ranks still running (DDP's Join gradient
semantics), with running statistics identical on every rank; errors reach every rank."""

import inspect
import threading

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncnorm
from syncnorm._compat import COMPILE_MIN_TORCH, TORCH_VERSION
from syncnorm.testing import RankFailure, run_ranks

LR = 0.1
# DDP's switch for the per-forward buffer broadcast (torch 2.14 renamed it). Off in these tests, so
# that identical running statistics at the end come from the stand-in, not from DDP's broadcasts.
_NO_BUFFER_SYNC = {
    ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
     else "broadcast_buffers"): False
}


def _net(norm):
    """BN first (its input needs no gradient: no backward sum), then one inside (backward sum)."""
    torch.manual_seed(0)
    return nn.Sequential(
        norm(3), nn.Linear(3, 4), norm(4), nn.ReLU(inplace=True), nn.Linear(4, 2)
    ).double()


def _channels_last(norm):
    """``norm`` for sequences ``(N, L, C)``, the layout of a transformer's activations (the Linear layers
    of ``_net`` act on the last dimension): it normalizes ``(N, C, L)``, as BatchNorm1d expects."""

    class SequenceNorm(norm):
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    return SequenceNorm


def _batch(rank, epoch, step, size, features=3, length=None):
    """``(size, features)``, or ``(size, length, features)`` for the sequence layers."""
    generator = torch.Generator().manual_seed(1000 * epoch + 10 * step + rank)
    shape = (size, features) if length is None else (size, length, features)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1


def _loss(out):
    # Quadratic, so that the backward sums of the inner BN are not trivially zero; a sum, so that an
    # empty batch adds nothing (a mean over an empty batch is NaN).
    return (out ** 2).sum() + out[:, 0].sum()


def _state(net):
    return [p.detach().clone() for p in net.parameters()], [b.clone() for b in net.buffers()]


def _reference(epochs, world, divide_by_initial=True, grad=True, owners=None, length=None):
    """One process: at each step, BatchNorm on the concatenated batches of the ranks still running.

    ``owners``: with ZeroRedundancyOptimizer, the rank that updates each parameter; torch's ZeRO join
    hook steps a rank's shard with that rank's own gradients, which it no longer has once it ran out,
    so that shard stays as it is while its owner stands in.
    """
    net = _net(nn.BatchNorm1d if length is None else _channels_last(nn.BatchNorm1d))
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    outputs = [[] for _ in range(world)]
    for epoch, sizes in enumerate(epochs):
        for step in range(max(len(s) for s in sizes)):
            active = [r for r in range(world) if step < len(sizes[r])]
            pieces = [_batch(r, epoch, step, sizes[r][step], length=length) for r in active]
            with torch.set_grad_enabled(grad):
                out = net(torch.cat(pieces))
            for r, piece in zip(active, out.split([p.size(0) for p in pieces])):
                outputs[r].append(piece.detach())
            if grad:
                _loss(out).backward()
                # DDP sums the running ranks' gradients (the rest contribute zero) and divides by the
                # initial world size, or by the number of running ranks.
                divisor = world if divide_by_initial else len(active)
                for i, p in enumerate(net.parameters()):
                    p.grad /= divisor
                    if owners is not None and owners[i] not in active:
                        p.grad = None
                optimizer.step()
                optimizer.zero_grad()
    return outputs, _state(net)


class _FunctionalNorm(nn.BatchNorm1d):
    """BatchNorm1d's parameters and buffers; its forward calls ``syncnorm.sync_batch_norm`` directly."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        return syncnorm.sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        self.training, self.momentum, self.eps)


def _train_rank(rank, world, epochs, zero=False, join_kwargs=None, device="cpu", length=None, functional=False):
    """This rank's outputs and final state (on the CPU); ``device``: where it trains (tests/test_gpu.py
    runs this on ``cuda:0``); ``length``: sequences ``(N, length, C)`` through ``_channels_last`` layers;
    ``functional``: layers that call ``sync_batch_norm`` (join cannot update a stand-in rank's buffers of
    such layers: DDP's default buffer broadcast keeps them equal instead)."""
    norm = _FunctionalNorm if functional else syncnorm.SyncBatchNorm
    net = _net(norm if length is None else _channels_last(norm)).to(device)
    model = DistributedDataParallel(net, **({} if functional else _NO_BUFFER_SYNC))
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=LR)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    outputs = []
    for epoch, sizes in enumerate(epochs):
        joinables = [optimizer] if zero else []
        with syncnorm.join(model, *joinables, **(join_kwargs or {})):
            for step, size in enumerate(sizes[rank]):
                out = model(_batch(rank, epoch, step, size, length=length).to(device))
                _loss(out).backward()
                optimizer.step()
                optimizer.zero_grad()
                outputs.append(out.detach().cpu())
    state = _state(net.cpu())
    if zero:
        mine = [q for group in optimizer.optim.param_groups for q in group["params"]]
        return outputs, state, [i for i, p in enumerate(net.parameters()) if any(p is q for q in mine)]
    return outputs, state


def _owners(results):
    """Which rank's ZeroRedundancyOptimizer shard holds each parameter."""
    return {i: rank for rank, result in enumerate(results) for i in result[2]}


def _check(results, reference):
    ref_outputs, (ref_params, ref_buffers) = reference
    for rank, (outputs, (params, buffers), *_) in enumerate(results):
        assert len(outputs) == len(ref_outputs[rank])
        for out, ref in zip(outputs, ref_outputs[rank]):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        for p, ref in zip(params, ref_params):
            torch.testing.assert_close(p, ref, rtol=0, atol=1e-10)
        for b, ref in zip(buffers, ref_buffers):
            torch.testing.assert_close(b, ref, rtol=0, atol=1e-10)  # num_batches_tracked included
        for b, first in zip(buffers, results[0][1][1]):
            assert torch.equal(b, first), "running statistics differ between ranks"


# Batch sizes per rank and step: rank 0 runs out after 3 steps, its last batch empty; rank 1 runs 5.
TWO_RANKS = [[[4, 3, 0], [2, 5, 3, 4, 2]]]
# Two epochs on 3 ranks: ranks run out at different steps; in the second epoch rank 0 has no batch at
# all and stands in with the iteration it recorded in the first.
THREE_RANKS = [[[2, 3], [3, 2, 4, 2], [1, 3, 2]], [[], [2, 3, 2], [3]]]


def test_two_ranks_uneven_batches_match_one_process():
    results = run_ranks(_train_rank, 2, TWO_RANKS, timeout=120, pg_timeout=30)
    _check(results, _reference(TWO_RANKS, 2))


def test_three_ranks_two_epochs_rank_without_batches_matches_one_process():
    results = run_ranks(_train_rank, 3, THREE_RANKS, timeout=120, pg_timeout=30)
    _check(results, _reference(THREE_RANKS, 3))


def test_zero_redundancy_optimizer_joins_too():
    results = run_ranks(_train_rank, 2, TWO_RANKS, True, timeout=120, pg_timeout=30)
    _check(results, _reference(TWO_RANKS, 2, owners=_owners(results)))


@pytest.mark.parametrize("world, epochs", [(2, TWO_RANKS), (3, THREE_RANKS)], ids=["2ranks", "3ranks"])
def test_layer_taking_another_layout_stands_in_with_its_own_shape(world, epochs):
    # A SyncBatchNorm subclass whose forward takes (N, L, C): the stand-in replays an empty batch of the
    # recorded shape, (0, L, C), which the subclass turns into (0, C, L) as for a real batch.
    results = run_ranks(_train_rank, world, epochs, False, None, "cpu", 5, timeout=120, pg_timeout=30)
    _check(results, _reference(epochs, world, length=5))


@pytest.mark.parametrize("world, epochs", [
    (2, TWO_RANKS), pytest.param(3, THREE_RANKS, marks=pytest.mark.slow),
    pytest.param(2, [[[4], [2, 5, 3]]], marks=pytest.mark.slow)], ids=["2ranks", "3ranks", "one-iteration"])
def test_functional_sync_batch_norm_inside_join_matches_one_process(world, epochs):
    # Issue 27 case 1: the stand-in replays a sync_batch_norm call's gather with its identity, so the
    # running ranks' check passes (it raised "the ranks reached different synced layers"). A rank that ran
    # one iteration replays the one that also agreed the packet widths: requests are not repeated, packets
    # have the group's width now.
    results = run_ranks(_train_rank, world, epochs, False, None, "cpu", None, True, timeout=120, pg_timeout=30)
    _check(results, _reference(epochs, world))


@pytest.mark.slow
def test_divide_by_running_ranks():
    kwargs = {"divide_by_initial_world_size": False}
    results = run_ranks(_train_rank, 3, THREE_RANKS, False, kwargs, timeout=120, pg_timeout=30)
    _check(results, _reference(THREE_RANKS, 3, divide_by_initial=False))


@pytest.mark.slow
def test_zero_redundancy_optimizer_three_ranks():
    results = run_ranks(_train_rank, 3, THREE_RANKS, True, timeout=120, pg_timeout=30)
    _check(results, _reference(THREE_RANKS, 3, owners=_owners(results)))


def _accumulate_rank(rank, world, steps):
    """Gradient accumulation: two micro-batches per optimizer step, the first under ``no_sync``."""
    net = _net(syncnorm.SyncBatchNorm)
    model = DistributedDataParallel(net, **_NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    outputs = []
    with syncnorm.join(model):
        for step, (first, second) in enumerate(steps[rank]):
            with model.no_sync():
                out = model(_batch(rank, 0, 2 * step, first))
                _loss(out).backward()
            outputs.append(out.detach())
            out = model(_batch(rank, 0, 2 * step + 1, second))
            _loss(out).backward()
            outputs.append(out.detach())
            optimizer.step()
            optimizer.zero_grad()
    return outputs, _state(net)


@pytest.mark.slow
def test_gradient_accumulation_with_no_sync():
    # Per rank, per optimizer step: the sizes of its two micro-batches; ranks run 2, 4 and 1 steps.
    steps = [[(4, 3), (2, 5)], [(3, 3), (4, 2), (5, 4), (2, 3)], [(4, 4)]]
    results = run_ranks(_accumulate_rank, 3, steps, timeout=120, pg_timeout=30)
    # One process: each micro-batch is BatchNorm over the running ranks' micro-batches; the gradients
    # of a step's two micro-batches add up and are divided by the initial world size.
    net = _net(nn.BatchNorm1d)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    outputs = [[] for _ in steps]
    for step in range(max(len(s) for s in steps)):
        active = [r for r in range(3) if step < len(steps[r])]
        for micro in range(2):
            pieces = [_batch(r, 0, 2 * step + micro, steps[r][step][micro]) for r in active]
            out = net(torch.cat(pieces))
            _loss(out).backward()
            for r, piece in zip(active, out.split([p.size(0) for p in pieces])):
                outputs[r].append(piece.detach())
        for p in net.parameters():
            p.grad /= 3
        optimizer.step()
        optimizer.zero_grad()
    _check(results, (outputs, _state(net)))


def _forward_only_rank(rank, world, epochs):
    """No DDP, no gradients: a model in training mode whose forward passes move the running statistics
    (what a precise-BN pass does)."""
    net = _net(syncnorm.SyncBatchNorm)
    outputs = []
    with torch.no_grad():
        for epoch, sizes in enumerate(epochs):
            with syncnorm.join(net):
                for step, size in enumerate(sizes[rank]):
                    outputs.append(net(_batch(rank, epoch, step, size)))
    return outputs, _state(net)


def test_forward_only_model_without_ddp():
    epochs = [[[3, 4], [2, 2, 5, 3]]]
    results = run_ranks(_forward_only_rank, 2, epochs, timeout=120, pg_timeout=30)
    _check(results, _reference(epochs, 2, grad=False))


def _recorder_rank(rank, world, sizes):
    """The internal record/replay API without Join: each rank knows how many iterations to replay."""
    from syncnorm import comm
    from syncnorm.join import CollectiveRecorder

    net = _net(syncnorm.SyncBatchNorm)
    recorder = CollectiveRecorder(net)
    outputs = []
    with torch.no_grad(), comm.routed(comm.side_groups([None]), recorder.observe), recorder:
        for step, size in enumerate(sizes[rank]):
            recorder.begin_iteration()
            outputs.append(net(_batch(rank, 0, step, size)))
        for _ in range(max(len(s) for s in sizes) - len(sizes[rank])):
            recorder.replay()
    return outputs, _state(net)


def test_record_and_replay_api_forward_only():
    sizes = [[3], [2, 4, 3]]
    results = run_ranks(_recorder_rank, 2, sizes, timeout=120, pg_timeout=30)
    _check(results, _reference([sizes], 2, grad=False))


def _reinit_rank(rank, world, store_dir):
    """Two rounds of the two-rank case, the default process group destroyed and initialized anew in
    between; returns each round's outputs, state and number of process groups created."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from syncnorm._compat import destroy_process_group

    created = []
    new_group = dist.new_group

    def counting_new_group(*args, **kwargs):
        created.append(args)
        return new_group(*args, **kwargs)

    dist.new_group = counting_new_group
    rounds = []
    for round in range(2):
        if round:
            destroy_process_group()
            store = dist.FileStore(os.path.join(store_dir, "second"), world)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
        before = len(created)
        rounds.append(_train_rank(rank, world, TWO_RANKS) + (len(created) - before,))
    return rounds


def test_side_groups_of_a_destroyed_default_group_are_not_reused(tmp_path):
    results = run_ranks(_reinit_rank, 2, str(tmp_path), timeout=120, pg_timeout=30)
    for round in range(2):
        _check([rounds[round] for rounds in results], _reference(TWO_RANKS, 2))
        assert [rounds[round][2] for rounds in results] == [1, 1]  # one side group, made anew


def _other_thread_rank(rank, world, sizes):
    """Forward-only join; after the first step another thread sends a sum over the default group."""
    from syncnorm import comm

    net = _net(syncnorm.SyncBatchNorm)
    outputs, sums = [], []
    with torch.no_grad(), syncnorm.join(net):
        for step, size in enumerate(sizes[rank]):
            outputs.append(net(_batch(rank, 0, step, size)))
            if step == 0:
                ones = torch.ones(5, dtype=torch.float64)
                helper = threading.Thread(target=lambda: sums.append(comm.sum_across_ranks(ones)))
                helper.start()
                helper.join()
    return outputs, _state(net), sums


def test_routing_is_per_thread():
    # The helper thread's sum is neither routed nor recorded: rank 0, which runs out after that step,
    # replays only its layers' gathers.
    sizes = [[3], [2, 4, 3]]
    results = run_ranks(_other_thread_rank, 2, sizes, timeout=120, pg_timeout=20)
    _check(results, _reference([sizes], 2, grad=False))
    assert all(torch.equal(result[2][0], torch.full((5,), 2.0, dtype=torch.float64)) for result in results)


class _Checkpointed(nn.Module):
    """``net`` with all but its first layer under reentrant activation checkpointing: their forward
    reruns in backward, and the backward of the rerun is the one that runs."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.net[1:], self.net[0](x), use_reentrant=True)


def _backward_in_thread_rank(rank, world, epochs, checkpointed=False):
    """The two-rank case with each backward run by another thread, as autograd runs the backward of CUDA
    tensors on its device threads: the backward sums follow their forward's route all the same, those
    of a checkpoint's recompute (which runs on that thread) included."""
    net = _net(syncnorm.SyncBatchNorm)
    model = DistributedDataParallel(_Checkpointed(net) if checkpointed else net, **_NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    outputs = []
    with syncnorm.join(model):
        for step, size in enumerate(epochs[0][rank]):
            out = model(_batch(rank, 0, step, size))
            helper = threading.Thread(target=_loss(out).backward)
            helper.start()
            helper.join()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
    return outputs, _state(net)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_backward_on_another_thread_follows_its_forward(checkpointed):
    # Needs the Function to keep its forward's route (ctx.route = comm.current_route()) and pass it to every
    # collective of its backward (route=ctx.route), and a recompute on that thread to follow the model's
    # route (join's layer hook, comm.follow); without them the collectives miss the side group and time out.
    results = run_ranks(_backward_in_thread_rank, 2, TWO_RANKS, checkpointed, timeout=120, pg_timeout=20)
    _check(results, _reference(TWO_RANKS, 2))


def _bad_input_rank(rank, world, counts, bad_rank, bad_step):
    model = DistributedDataParallel(_net(syncnorm.SyncBatchNorm))
    with syncnorm.join(model):
        for step in range(counts[rank]):
            features = 5 if (rank, step) == (bad_rank, bad_step) else 3
            _loss(model(_batch(rank, 0, step, 4, features))).backward()


@pytest.mark.parametrize("world, counts, bad_rank", [
    (2, [1, 3], 1),
    pytest.param(3, [1, 3, 2], 1, marks=pytest.mark.slow),
])
def test_bad_input_on_a_running_rank_fails_every_rank(world, counts, bad_rank):
    # The bad batch comes after another rank ran out: that rank learns of it in its stand-in.
    with pytest.raises(RankFailure) as failure:
        run_ranks(_bad_input_rank, world, counts, bad_rank, 2, timeout=90, pg_timeout=60)
    text = str(failure.value)
    assert f"{world} of {world} ranks failed" in text
    assert "no result" not in text and "Timed out" not in text  # every rank raised, none waited
    assert "expected input with 3 channels" in text
    assert text.count(f"invalid input on rank(s) {bad_rank}") == world - 1


def _no_batch_first_rank(rank, world):
    model = DistributedDataParallel(_net(syncnorm.SyncBatchNorm))
    with syncnorm.join(model):
        for step in range(rank):  # rank 0 has no batch, and nothing was recorded before
            _loss(model(_batch(rank, 0, step, 4))).backward()


def test_rank_without_any_iteration_to_repeat_fails_every_rank():
    with pytest.raises(RankFailure) as failure:
        run_ranks(_no_batch_first_rank, 2, timeout=90, pg_timeout=60)
    text = str(failure.value)
    assert "2 of 2 ranks failed" in text and "no result" not in text
    assert text.count("got none on rank(s) 0") == 2


def test_compiled_model_is_one_clear_error():
    # Raised on entry, before any collective: the same on every rank, so none is left waiting.
    net = _net(syncnorm.SyncBatchNorm)
    for compiled in (torch.compile(net), nn.Sequential(torch.compile(net))):
        with pytest.raises(ValueError, match="expected an eager model"):
            with syncnorm.join(compiled):
                pass


class _CompiledInside(nn.Module):
    """A model whose forward calls a compiled function: nothing on entry shows that it compiles."""

    def __init__(self):
        super().__init__()
        self.net = _net(syncnorm.SyncBatchNorm)
        self.run = torch.compile(self.net.forward)

    def forward(self, x):
        return self.run(x)


def _compiled_inside_rank(rank, world, epochs):
    wrapper = _CompiledInside()
    model = DistributedDataParallel(wrapper, **_NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    outputs = []
    with syncnorm.join(model):
        for step, size in enumerate(epochs[0][rank]):
            out = model(_batch(rank, 0, step, size))
            _loss(out).backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
    return outputs, _state(wrapper.net)


@pytest.mark.slow
@pytest.mark.skipif(TORCH_VERSION < COMPILE_MIN_TORCH, reason="synced layers compile from torch 2.9 on")
def test_compiled_function_inside_the_model_is_one_clear_error():
    # Not visible on entry; the first synced collective the graph would send raises on every rank.
    with pytest.raises(RankFailure) as failure:
        run_ranks(_compiled_inside_rank, 2, TWO_RANKS, timeout=300, pg_timeout=120)
    text = str(failure.value)
    assert "2 of 2 ranks failed" in text and "no result" not in text
    assert text.count("expected synced layers that run eagerly") == 2


def test_routes_are_one_per_thread_and_end_with_their_context():
    from syncnorm import comm

    with comm.routed({}) as route:
        assert comm.current_route() is route and route.active
        with pytest.raises(RuntimeError, match="one comm.routed context per thread"):
            with comm.routed({}):
                pass
        seen = []
        helper = threading.Thread(target=lambda: seen.append(comm.current_route()))
        helper.start()
        helper.join()
        assert seen == [None]
    assert comm.current_route() is None and not route.active  # a late backward is not routed


def test_one_process_is_plain():
    net = _net(syncnorm.SyncBatchNorm)
    reference = _net(nn.BatchNorm1d)
    x = _batch(0, 0, 0, 5)
    with syncnorm.join(net):
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=1e-12)
