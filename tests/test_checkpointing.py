"""Synced layers inside real training loops: activation checkpointing and gradient accumulation.

Checkpointing: a forward that activation checkpointing recomputes in backward (``torch.utils.checkpoint``
reentrant and not, the composable ``checkpoint(module)``, a hand-written recompute Function, a compiled
block inside an eager region) syncs again, as every rank recomputes at the same point of its backward,
and leaves the running statistics and ``num_batches_tracked`` alone. So a checkpointed model gives the
same bits as the same model without checkpointing (outputs, every gradient, running statistics,
``num_batches_tracked``), with one more gather per recomputed call, and both equal BatchNorm in one
process on the concatenated batch; a recompute that sees other input than its forward gives what
BatchNorm on the global batch gives under the same recompute. Gradient accumulation: with DDP's ``no_sync()`` each micro-batch is normalized
over all ranks' micro-batches and the running statistics move once per micro-batch, as one process
running BatchNorm on each micro-step's concatenated micro-batches with gradients accumulated.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import syncnorm
from syncnorm import comm
from syncnorm.testing import run_ranks

TIMEOUT = 240.0
SIZES = [[3, 5], [4, 0], [2, 6]]  # per step, each rank's batch (rank 1 empty in the second step)
MODES = {"plain": None, "reentrant": True, "non-reentrant": False}


class Blocks(nn.Module):
    """A stem and two checkpointable segments; ``shared`` is called once in the first segment and twice
    in the second, so a layer's recomputes must find their own forward among several per step."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.3))
        self.shared = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.use_reentrant = None  # None: no checkpointing

    def segment1(self, x):
        return self.shared(self.block1(x))

    def segment2(self, x):
        return self.shared(F.relu(self.shared(self.block2(x))))

    def forward(self, x):
        x = self.stem(x)
        for segment in (self.segment1, self.segment2):
            if self.use_reentrant is None:
                x = segment(x)
            else:
                x = checkpoint(segment, x, use_reentrant=self.use_reentrant)
        return self.head(x.mean((2, 3)))


def _batch(step, sizes):
    """The global batch of ``step`` (every rank builds it and takes its slice)."""
    generator = torch.Generator().manual_seed(step)
    return torch.randn(sum(sizes), 2, 5, 5, generator=generator, dtype=torch.float64) * 2 + 0.5


class CollectiveCounter:
    """Counts the synced layers' collectives (statistics gathers, backward sums) on this rank."""

    def __init__(self) -> None:
        self.counts = {"gather": 0, "sum": 0}
        self._originals = (comm.all_gather, comm.start_sum_across_ranks)

        def gather(*args, **kwargs):
            self.counts["gather"] += 1
            return self._originals[0](*args, **kwargs)

        def start_sum(*args, **kwargs):
            self.counts["sum"] += 1
            return self._originals[1](*args, **kwargs)

        comm.all_gather, comm.start_sum_across_ranks = gather, start_sum

    def take(self):
        counts, self.counts = dict(self.counts), {"gather": 0, "sum": 0}
        return counts

    def close(self):
        comm.all_gather, comm.start_sum_across_ranks = self._originals


def _train(model, rank, steps_sizes, counter):
    """SGD steps of ``model`` on this rank's slices; parameter gradients summed over ranks as DDP would
    (up to its 1/world_size). Returns per step: output, input grad, parameter grads, backward collectives."""
    import torch.distributed as dist

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step, sizes in enumerate(steps_sizes):
        x = _batch(step, sizes)
        start = sum(sizes[:rank])
        local_x = x[start : start + sizes[rank]].clone().requires_grad_()
        optimizer.zero_grad()
        torch.manual_seed(step)  # the same dropout masks in every mode
        y = model(local_x)
        upstream = torch.linspace(-1, 1, 3 * sum(sizes), dtype=y.dtype).view(-1, 3)[start : start + sizes[rank]]
        counter.take()
        (y * upstream).sum().backward()
        backward_collectives = counter.take()
        for param in model.parameters():
            dist.all_reduce(param.grad)
        record.append({
            "output": y.detach(), "input grad": local_x.grad,
            "grads": [param.grad.clone() for param in model.parameters()],
            "backward collectives": backward_collectives,
        })
        optimizer.step()
    return record


def _state(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _checkpointing_case(rank, world_size):
    """Per dropout probability and mode: each step's record, the final state, one more step's collectives;
    and BatchNorm in one process (no dropout) on the concatenated batch."""
    torch.manual_seed(0)
    plain_bn = Blocks().double()
    synced = syncnorm.convert_sync_batchnorm(copy.deepcopy(plain_bn))
    counter = CollectiveCounter()
    results = {}
    try:
        for dropout in (0.3, 0.0):
            for name, use_reentrant in MODES.items():
                model = copy.deepcopy(synced)
                model.block2[2].p = dropout
                model.use_reentrant = use_reentrant
                steps = _train(model, rank, SIZES, counter)
                state = _state(model)
                # The collectives of one more whole step (the first step's forward also checks
                # num_features once per layer).
                x = _batch(99, [3, 5])[[0, 3][rank] : [3, 8][rank]].clone().requires_grad_()
                counter.take()
                model(x).sum().backward()
                results[dropout, name] = {"steps": steps, "state": state, "step collectives": counter.take()}
    finally:
        counter.close()
    reference = copy.deepcopy(plain_bn)
    reference.block2[2].p = 0.0
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_steps = []
    for step, sizes in enumerate(SIZES):
        x = _batch(step, sizes).requires_grad_()
        optimizer.zero_grad()
        y = reference(x)
        upstream = torch.linspace(-1, 1, 3 * sum(sizes), dtype=y.dtype).view(-1, 3)
        (y * upstream).sum().backward()
        start = sum(sizes[:rank])
        ref_steps.append({"output": y.detach()[start : start + sizes[rank]],
                          "input grad": x.grad[start : start + sizes[rank]],
                          "grads": [param.grad.clone() for param in reference.parameters()]})
        optimizer.step()
    results["reference"] = {"steps": ref_steps, "state": _state(reference)}
    return results


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _close(actual, expected, rel=1e-10):
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        return False
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return actual.numel() == 0 or (actual - expected).abs().max().item() <= rel * scale


def test_checkpointed_model_equals_the_plain_model_bitwise_and_batchnorm_on_the_global_batch():
    per_rank = run_ranks(_checkpointing_case, 2, timeout=TIMEOUT, pg_timeout=60.0)
    for rank, results in enumerate(per_rank):
        for dropout in (0.3, 0.0):
            plain = results[dropout, "plain"]
            for name in ("reentrant", "non-reentrant"):
                run, what = results[dropout, name], f"rank {rank}, {name}, dropout {dropout}"
                for step, (got, want) in enumerate(zip(run["steps"], plain["steps"])):
                    for key in ("output", "input grad"):
                        assert _same_bits(got[key], want[key]), f"{what}, step {step}: {key} differs"
                    assert all(map(_same_bits, got["grads"], want["grads"])), f"{what}, step {step}: grads"
                    # The backward re-syncs each recomputed call (5: block1, block2, shared three times):
                    # one more gather each, no second backward sum.
                    more = {"gather": want["backward collectives"]["gather"] + 5,
                            "sum": want["backward collectives"]["sum"]}
                    assert got["backward collectives"] == more, (what, step)
                for key, value in plain["state"].items():
                    assert _same_bits(run["state"][key], value), f"{what}: {key} differs"
                # One more step, forward and backward: one gather and one sum per synced layer call
                # (5 calls: block1, block2, shared three times), and one gather per recomputed call.
                assert plain["step collectives"] == {"gather": 5, "sum": 5}, what
                assert run["step collectives"] == {"gather": 10, "sum": 5}, what
            assert plain["state"]["shared.num_batches_tracked"].item() == 3 * len(SIZES)
        # Against BatchNorm on the concatenated batch (no dropout), every mode.
        reference = results["reference"]
        for name in MODES:
            run, what = results[0.0, name], f"rank {rank}, {name} vs BatchNorm"
            for step, (got, want) in enumerate(zip(run["steps"], reference["steps"])):
                for key in ("output", "input grad"):
                    assert _close(got[key], want[key]), f"{what}, step {step}: {key}"
                assert all(map(_close, got["grads"], want["grads"])), f"{what}, step {step}: grads"
            for key, value in reference["state"].items():
                assert _close(run["state"][key], value), f"{what}: {key}"


def test_torch_batchnorm_updates_twice_under_checkpointing():
    # What the docs say torch's own layer does (pytorch issue 96136): the recompute is a second
    # training forward. If torch changes this, docs/training_loops.md must change with it.
    layer = nn.BatchNorm1d(3)
    x = torch.randn(6, 3, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert layer.num_batches_tracked.item() == 2


class SharedOnTwo(nn.Module):
    """One synced layer applied to two inputs inside one checkpointed region."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.BatchNorm1d(3)
        self.use_reentrant = None  # None: no checkpointing

    def body(self, u, w):
        return self.shared(u) * 1.5 + self.shared(w).pow(2)  # not symmetric in u and w

    def forward(self, u, w):
        if self.use_reentrant is None:
            return self.body(u, w)
        return checkpoint(self.body, u, w, use_reentrant=self.use_reentrant)


def _collision_case(rank, world_size):
    """Per mode: output, input and parameter gradients, buffers. On rank 0 the two inputs are equal bit
    for bit (so are the two calls' local statistics), on the other ranks not: the two forwards have
    the same local statistics on rank 0 and different global ones."""
    results = {}
    for name, use_reentrant in MODES.items():
        torch.manual_seed(0)
        model = syncnorm.convert_sync_batchnorm(SharedOnTwo().double())
        model.use_reentrant = use_reentrant
        generator = torch.Generator().manual_seed(rank)
        u = torch.randn(4, 3, generator=generator, dtype=torch.float64)
        w = u.clone() if rank == 0 else torch.randn(4, 3, generator=generator, dtype=torch.float64) * 3 + 1
        u.requires_grad_(), w.requires_grad_()
        y = model(u, w)
        (y * torch.linspace(-1, 2, 12, dtype=torch.float64).view(4, 3)).sum().backward()
        results[name] = [y.detach(), u.grad, w.grad, model.shared.weight.grad, model.shared.bias.grad,
                         *_state(model).values()]
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_shared_layer_whose_two_calls_have_equal_local_statistics_recomputes_each_exactly(world_size):
    for rank, results in enumerate(run_ranks(_collision_case, world_size, timeout=TIMEOUT, pg_timeout=30.0)):
        for name in ("reentrant", "non-reentrant"):
            for index, (got, want) in enumerate(zip(results[name], results["plain"])):
                assert torch.equal(got, want), (rank, name, index, (got - want).abs().max())


# Gradient accumulation: per optimizer step, micro-batches of these per-rank sizes.
MICRO_SIZES = [[[3, 2], [0, 4]], [[4, 1], [3, 3]]]  # rank 0 empty in one micro-batch


def _small_model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
        nn.BatchNorm1d(3),
    ).double()


def _accumulation_case(rank, world_size):
    """DDP with no_sync() for all but the last micro-batch of each step: each micro-step's outputs and
    the final state, next to one process running BatchNorm on each micro-step's concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    reference = _small_model()
    ddp = DDP(syncnorm.convert_sync_batchnorm(copy.deepcopy(reference)))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, ddp)]
    errors = {}

    def note(key, actual, expected):
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
        if actual.numel():
            scale = max(1.0, expected.abs().max().item())
            errors[key] = max(errors.get(key, 0.0), (actual - expected).abs().max().item() / scale)

    for step, micro_sizes in enumerate(MICRO_SIZES):
        for optimizer in optimizers:
            optimizer.zero_grad()
        for micro, sizes in enumerate(micro_sizes):
            x = _batch(10 * step + micro, sizes)
            upstream = torch.linspace(-1, 1, 3 * sum(sizes), dtype=x.dtype).view(-1, 3)
            start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
            # DDP averages gradients over ranks: the reference's loss is the global sum / world_size.
            y_ref = reference(x)
            ((y_ref * upstream).sum() / world_size).backward()
            last = micro == len(micro_sizes) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                y = ddp(x[start:stop])
                (y * upstream[start:stop]).sum().backward()
            note("output", y.detach(), y_ref.detach()[start:stop])
        for param, param_ref in zip(ddp.parameters(), reference.parameters()):
            note("accumulated grad", param.grad, param_ref.grad)
        for optimizer in optimizers:
            optimizer.step()
    state, state_ref = ddp.module.state_dict(), reference.state_dict()
    for key in state_ref:
        note(key, state[key].double(), state_ref[key].double())
    return errors, ddp.module[1].num_batches_tracked.item()


def test_gradient_accumulation_with_no_sync_equals_batchnorm_on_each_micro_steps_global_batch():
    for rank, (errors, steps) in enumerate(run_ranks(_accumulation_case, 2, timeout=TIMEOUT, pg_timeout=60.0)):
        bad = {key: error for key, error in errors.items() if not error <= 1e-10}
        assert not bad, f"rank {rank}: differs from BatchNorm on the concatenated micro-batches: {bad}"
        assert "1.running_mean" in errors and "accumulated grad" in errors, errors
        # The running statistics moved once per micro-batch: 2 steps x 2 micro-batches.
        assert steps == 4, (rank, steps)


def _compiled_checkpointing_case(rank, world_size, use_reentrant):
    torch.manual_seed(0)
    plain = syncnorm.convert_sync_batchnorm(Blocks().double())
    plain.block2[2].p = 0.0
    checkpointed = copy.deepcopy(plain)
    checkpointed.use_reentrant = use_reentrant
    torch._dynamo.reset()
    compiled = torch.compile(checkpointed, backend="aot_eager")
    runs = []
    for model in (plain, compiled):
        x = _batch(0, [3, 5])[[0, 3][rank] : [3, 8][rank]].clone().requires_grad_()
        y = model(x)
        y.square().sum().backward()
        runs.append([y.detach(), x.grad] + [param.grad for param in model.parameters()] + list(model.buffers()))
    return [(a.double() - b.double()).abs().max().item() for a, b in zip(*runs)]


@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_compiled_checkpointed_model_equals_the_eager_plain_model(use_reentrant):
    # Under torch.compile the compiler recomputes inside its own graphs and never reruns the layer's
    # Python forward (nor its collectives, which it never recomputes): the eager answer, buffers included.
    from syncnorm._compat import COMPILE_MIN_TORCH, TORCH_VERSION

    if TORCH_VERSION < COMPILE_MIN_TORCH:
        pytest.skip("torch.compile of syncnorm needs a newer torch")
    for rank, errors in enumerate(run_ranks(_compiled_checkpointing_case, 2, use_reentrant, timeout=TIMEOUT)):
        assert max(errors) <= 1e-12, (rank, errors)


# --------------------------------------------------------------------------- the launcher's option


def _launcher_case(rank, world_size, out, name):
    from syncnorm.train.config import from_dict
    from syncnorm.train.loop import train
    from syncnorm.train.ui import Reporter

    results = []
    for checkpointed in (False, True):
        cfg = from_dict({
            "model": {"name": name, "norm": "syncbn", "checkpoint_activations": checkpointed},
            "data": {"name": "synthetic", "synthetic_samples": 96, "synthetic_shape": [3, 16, 16]}
            if name == "resnet18" else {"name": "mnist5k"},
            "train": {"epochs": 1, "batch_size": 8, "max_steps": 3, "dtype": "float64", "seed": 3},
            "output_dir": f"{out}/{name}-{checkpointed}",
        })
        counter = CollectiveCounter()
        try:
            result = train(cfg, reporter=Reporter(enabled=False))
        finally:
            counter.close()
        # Gathers per backward sum: 1 without checkpointing; more with it (the recomputes re-sync).
        counts = counter.take()
        results.append((_state(result.model), result.metrics, counts["gather"] / counts["sum"]))
    return results


@pytest.mark.parametrize("name", ["lenet", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_launcher_checkpoint_activations_trains_exactly_like_the_plain_run(tmp_path, name):
    # The launcher needs the `train` extra, absent from the floor-torch CI venv (core tests only).
    pytest.importorskip("yaml")
    pytest.importorskip("rich")
    deterministic = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "samples")
    for rank, (plain, checkpointed) in enumerate(
        run_ranks(_launcher_case, 2, str(tmp_path), name, timeout=TIMEOUT, pg_timeout=60.0)
    ):
        state, metrics, gathers = plain
        state_ck, metrics_ck, gathers_ck = checkpointed
        assert gathers_ck > gathers, (rank, gathers, gathers_ck)
        assert state.keys() == state_ck.keys()
        for key in state:
            assert _same_bits(state_ck[key], state[key]), f"rank {rank}: {key} differs"
        for row, row_ck in zip(metrics, metrics_ck):
            assert {k: row[k] for k in deterministic} == {k: row_ck[k] for k in deterministic}, rank
        assert state_ck["1.num_batches_tracked" if name == "lenet" else "bn1.num_batches_tracked"].item() == 3


# --------------------------------------------------------------------------- with syncnorm.join


class _CheckpointedMiddle(nn.Module):
    """A synced layer on the input, then Linear-BN-ReLU checkpointed in the given mode, then a Linear."""

    def __init__(self, use_reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle = syncnorm.SyncBatchNorm(3), nn.Sequential(
            nn.Linear(3, 4), syncnorm.SyncBatchNorm(4), nn.ReLU())
        self.last = nn.Linear(4, 2)
        self.use_reentrant = use_reentrant
        self.double()

    def forward(self, x):
        x = self.first(x)
        if self.use_reentrant is not None:
            return self.last(checkpoint(self.middle, x, use_reentrant=self.use_reentrant))
        return self.last(self.middle(x))


def _join_case(rank, world_size, use_reentrant):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_CheckpointedMiddle(use_reentrant))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    with syncnorm.join(model):
        for step in range([3, 2][rank]):  # rank 1 runs out one step early
            x = torch.randn(4 + rank, 3, generator=torch.Generator().manual_seed(10 * step + rank),
                            dtype=torch.float64)
            out = model(x)
            (out ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
    return outputs, _state(model.module)


def test_checkpointing_inside_syncnorm_join_equals_join_without_it():
    # join's stand-in repeats the synced collectives it saw in an iteration, a recompute's gather as a recompute.
    plain = run_ranks(_join_case, 2, None, timeout=TIMEOUT, pg_timeout=60.0)
    for use_reentrant in (True, False):
        for rank, (outputs, state) in enumerate(run_ranks(_join_case, 2, use_reentrant, timeout=TIMEOUT,
                                                          pg_timeout=60.0)):
            assert all(map(_same_bits, outputs, plain[rank][0])), (use_reentrant, rank)
            for key, value in plain[rank][1].items():
                assert _same_bits(state[key], value), (use_reentrant, rank, key)
            assert state["middle.1.num_batches_tracked"].item() == 3, (use_reentrant, rank)


# --------------------------------------------------------------------------- issue 27: every way to recompute


class _Recompute(torch.autograd.Function):
    """A hand-written activation checkpoint: forward without a graph, rerun with one in backward."""

    @staticmethod
    def forward(ctx, fn, u, w):
        ctx.fn = fn
        ctx.save_for_backward(u, w)
        with torch.no_grad():
            return fn(u, w)

    @staticmethod
    def backward(ctx, grad):
        u, w = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            y = ctx.fn(u, w)
        torch.autograd.backward(y, grad)
        return None, u.grad, w.grad


class _Case(nn.Module):
    """One BatchNorm layer called on two inputs, under one recompute mechanism (``kind``) or none."""

    def __init__(self, kind, norm=nn.BatchNorm1d) -> None:
        super().__init__()
        self.bn, self.kind = norm(3), kind
        self.wrapped = nn.Sequential(self.bn)  # what the composable checkpoint(module) API wraps

    def discarded_region(self, u, w):
        self.bn(w * 2)  # its output is never used; its statistics count (as in BatchNorm)
        return self.bn(u) * 1.5 + self.bn(w).pow(2)

    def forward(self, u, w):
        if self.kind in ("discarded", "discarded-plain"):
            return self.discarded_region(u, w) if self.kind == "discarded-plain" else checkpoint(
                self.discarded_region, u, w, use_reentrant=False)
        if self.kind in ("loop", "loop-plain"):  # 70 reentrant regions, each one call of the layer
            for _ in range(70):
                u = (self.bn(u) if self.kind == "loop-plain" else checkpoint(self.bn, u, use_reentrant=True)) * 0.5 + u
        if self.kind == "function":  # two regions, one call each
            return _Recompute.apply(lambda a, b: self.bn(a), u, w) * 1.5 + _Recompute.apply(
                lambda a, b: self.bn(b), u, w).pow(2)
        if self.kind == "composable":  # checkpoint(module): two regions
            return self.wrapped(u) * 1.5 + self.wrapped(w).pow(2)
        return self.bn(u) * 1.5 + self.bn(w).pow(2)


# Per step, each rank's batch: rank 0's two inputs are equal bit for bit in the first step (so are its
# two calls' local statistics), rank 1's batch is empty in the second.
CASE_SIZES = [[3, 4, 2], [4, 0, 3]]


def _case_inputs(step, sizes, rank=None):
    """The global (u, w) of ``step``, or ``rank``'s slices."""
    generator = torch.Generator().manual_seed(step)
    u = torch.randn(sum(sizes), 3, generator=generator, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(sum(sizes), 3, generator=generator, dtype=torch.float64)
    if step == 0:
        w[: sizes[0]] = u[: sizes[0]]
    if rank is None:
        return u, w
    start = sum(sizes[:rank])
    return u[start : start + sizes[rank]].clone(), w[start : start + sizes[rank]].clone()


def _run_case(model, steps, rank=None):
    """SGD steps; per step output, input grads, parameter grads (summed over ranks); final buffers."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step, sizes in enumerate(steps):
        u, w = (t.requires_grad_() for t in _case_inputs(step, sizes, rank))
        optimizer.zero_grad()
        y = model(u, w)
        upstream = torch.linspace(-1, 2, 3 * sum(sizes), dtype=y.dtype).view(-1, 3)
        if rank is not None:
            upstream = upstream[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
        (y * upstream).sum().backward()
        if rank is not None:  # as DDP would (up to its 1 / world size)
            import torch.distributed as dist

            for param in model.parameters():
                dist.all_reduce(param.grad)
        record.append([y.detach(), u.grad, w.grad] + [param.grad.clone() for param in model.parameters()])
        optimizer.step()
    return record, _state(model)


def _recompute_kinds_case(rank, world_size, kinds):
    return {kind: _recompute_kind_case(rank, world_size, kind) for kind in kinds}


def _recompute_kind_case(rank, world_size, kind):
    torch.manual_seed(0)
    plain = _Case(None).double()
    model = _Case(kind, syncnorm.SyncBatchNorm).double()
    model.load_state_dict(plain.state_dict())
    if kind == "composable":
        from torch.distributed._composable import checkpoint as composable_checkpoint

        composable_checkpoint(model.wrapped)
    steps = [sizes[:world_size] for sizes in CASE_SIZES]
    got = _run_case(model, steps, rank)
    # One process: BatchNorm on the concatenated batches, the same calls, no checkpointing.
    plain.kind = f"{kind}-plain"
    reference, ref_state = _run_case(plain, steps)
    errors = []
    for step, (mine, ref) in enumerate(zip(got[0], reference)):
        start, stop = sum(steps[step][:rank]), sum(steps[step][: rank + 1])
        ref = [t[start:stop] for t in ref[:3]] + ref[3:]
        errors += [_close(a, b) for a, b in zip(mine, ref)]
    errors += [_close(got[1][key], ref_state[key]) for key in ref_state]
    return errors, got[1]["bn.num_batches_tracked"].item()


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_recompute_mechanism_equals_batchnorm_on_the_global_batch(world_size):
    # Issue 27 case 5: the composable checkpoint(module) API and a hand-written recompute Function, each
    # with one rank's two calls equal (first step) and one rank's batch empty (second); a non-reentrant
    # region whose first call's output is discarded; 70 reentrant regions of one layer in a loop (more
    # than the 64 forwards the record design kept). Each recomputed call re-syncs.
    kinds = ["composable", "function", "discarded", "loop"]
    for rank, results in enumerate(run_ranks(_recompute_kinds_case, world_size, kinds, timeout=TIMEOUT,
                                             pg_timeout=30.0)):
        for kind, (matches, steps) in results.items():
            assert all(matches), (rank, kind, matches)
            calls = {"discarded": 3, "loop": 72}.get(kind, 2)
            assert steps == calls * len(CASE_SIZES), (rank, kind, steps)


def _other_input_cases(rank, world_size):
    return [_other_input_case(rank, world_size, use_reentrant) for use_reentrant in (False, True)]


def _other_input_case(rank, world_size, use_reentrant):
    """A recompute that sees other input than its forward (a scale that changes between the two)."""
    scale = [1.0]

    def noisy(layer, x):
        scale[0] += 0.5  # the forward sees x * 1.5, the recompute x * 2
        return layer(x * scale[0])

    torch.manual_seed(0)
    plain = nn.BatchNorm1d(3).double()
    layer = syncnorm.convert_sync_batchnorm(copy.deepcopy(plain))
    sizes = [3, 5, 2][:world_size]
    x = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = torch.linspace(-1, 2, x.numel(), dtype=x.dtype).view_as(x)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    local = x[start:stop].clone().requires_grad_()
    y = checkpoint(noisy, layer, local, use_reentrant=use_reentrant)
    (y * upstream[start:stop]).sum().backward()
    # One process, the same recompute: torch's BatchNorm counts the recompute as a second step, so
    # its buffers are taken before backward (syncnorm updates them once, in the forward).
    scale[0] = 1.0
    x.requires_grad_()
    y_ref = checkpoint(noisy, plain, x, use_reentrant=use_reentrant)
    ref_buffers = _state(plain)
    (y_ref * upstream).sum().backward()
    pairs = [(y.detach(), y_ref.detach()[start:stop]), (local.grad, x.grad[start:stop])]
    pairs += [(a, b) for a, b in zip(_state(layer).values(), ref_buffers.values())]
    return [_close(a, b) for a, b in pairs]


@pytest.mark.parametrize("world_size", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_a_recompute_that_sees_other_input_gives_batchnorm_under_the_same_recompute(world_size):
    # Both modes. The record design raised "expected a recomputed forward to see the same input".
    for rank, modes in enumerate(run_ranks(_other_input_cases, world_size, timeout=TIMEOUT, pg_timeout=30.0)):
        for use_reentrant, matches in zip((False, True), modes):
            assert all(matches), (rank, use_reentrant, matches)


def _compiled_block_case(rank, world_size, use_reentrant, backend):
    """Issue 27 case 2: a torch.compile'd block called inside an eager checkpoint region, 4 steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).double()
    block = torch.compile(syncnorm.convert_sync_batchnorm(copy.deepcopy(plain)), backend=backend, fullgraph=True)
    matches = []
    for step in range(4):
        sizes = [3, 5, 2][:world_size]
        x = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        local = x[start:stop].clone().requires_grad_()
        y = checkpoint(block, local, use_reentrant=use_reentrant)
        y.pow(2).sum().backward()
        x.requires_grad_()
        y_ref = plain(x)
        y_ref.pow(2).sum().backward()
        matches += [_close(y.detach(), y_ref.detach()[start:stop]), _close(local.grad, x.grad[start:stop])]
    state = _state(block)
    matches += [_close(state[f"_orig_mod.{key}"], value) for key, value in _state(plain).items()]
    return matches, state["_orig_mod.1.num_batches_tracked"].item()


@pytest.mark.parametrize("use_reentrant,world_size,backend", [
    (False, 2, "aot_eager"),
    pytest.param(True, 3, "aot_eager", marks=pytest.mark.slow),
    pytest.param(False, 2, "inductor", marks=pytest.mark.slow),
])
def test_compiled_block_inside_an_eager_checkpoint_counts_each_step_once(use_reentrant, world_size, backend):
    from syncnorm._compat import COMPILE_MIN_TORCH, TORCH_VERSION

    if TORCH_VERSION < COMPILE_MIN_TORCH:
        pytest.skip("torch.compile of syncnorm needs a newer torch")
    for rank, (matches, steps) in enumerate(run_ranks(
        _compiled_block_case, world_size, use_reentrant, backend, timeout=TIMEOUT, pg_timeout=60.0
    )):
        assert steps == 4, (rank, steps)
        assert all(matches), (rank, matches)
