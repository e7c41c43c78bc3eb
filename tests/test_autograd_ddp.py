"""gradcheck across ranks, and DDP training that equals one process on the N-times batch."""


import torch
import torch.distributed as dist
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks


def _all_gather_rows(local, sizes):
    """Concatenation of every rank's rows (gloo gathers equal sizes only, so pad to the largest)."""
    longest = max(sizes)
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[: local.size(0)] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


class _TakeSlice(torch.autograd.Function):
    """Rank's slice of a global tensor every rank holds; backward gathers every rank's slice gradient,
    so each rank sees the gradient with respect to the whole global tensor."""

    @staticmethod
    def forward(ctx, full, sizes, rank):
        ctx.sizes = sizes
        start = sum(sizes[:rank])
        return full[start : start + sizes[rank]].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad, ctx.sizes), None, None


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's output; the upstream gradient is the same on every rank, so each takes
    its own rows of it."""

    @staticmethod
    def forward(ctx, local, sizes, rank):
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return _all_gather_rows(local, sizes)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.size], None, None


class _Replicated(torch.autograd.Function):
    """A parameter every rank holds; its gradient is the sum of every rank's (what DDP does, up to 1/N)."""

    @staticmethod
    def forward(ctx, parameter):
        return parameter.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _gradcheck(rank, world_size):
    sizes = [3, 5]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(sizes), 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.rand(2, dtype=torch.float64, generator=generator).add_(0.5).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, generator=generator).requires_grad_()

    def global_batch_norm(x, weight, bias):
        # Y = SyncBN over the concatenated batch, as a function of the global X, weight and bias,
        # computed identically on every rank.
        local = syncnorm.sync_batch_norm(
            _TakeSlice.apply(x, sizes, rank), None, None,
            _Replicated.apply(weight), _Replicated.apply(bias), training=True,
        )
        return _GatherRows.apply(local, sizes, rank)

    return torch.autograd.gradcheck(global_batch_norm, (x, weight, bias), eps=1e-6, atol=1e-8)


def test_gradcheck_across_two_ranks():
    assert run_ranks(_gradcheck, 2, timeout=180) == [True, True]


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
    ).double()


def _data(steps, batch):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, 3, 6, 6, dtype=torch.float64, generator=generator) * 2 + 1,
         torch.randint(0, 4, (batch,), generator=generator))
        for _ in range(steps)
    ]


def _train(model, batches, steps_lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=steps_lr, momentum=0.9, weight_decay=1e-4)
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def _train_ddp(rank, world_size, batches, wrap_first):
    model = _small_net()
    if wrap_first:
        # Converting through the DDP wrapper works too: the layers keep DDP's parameter objects.
        model = syncnorm.convert_sync_batchnorm(nn.parallel.DistributedDataParallel(model))
    else:
        model = nn.parallel.DistributedDataParallel(syncnorm.convert_sync_batchnorm(model))
    per_rank = batches[0][0].size(0) // world_size
    local = [(x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]) for x, y in batches]
    _train(model, local)
    converted = sum(isinstance(m, syncnorm.SyncBatchNorm) for m in model.modules())
    return converted, {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_ddp_training_equals_one_process_on_the_global_batch():
    world_size, steps = 2, 4
    batches = _data(steps, batch=4 * world_size)
    reference = _small_net()
    _train(reference, batches)
    expected = reference.state_dict()
    for wrap_first in (False, True):
        for converted, state in run_ranks(_train_ddp, world_size, batches, wrap_first):
            assert converted == 3
            assert state.keys() == expected.keys()
            for name, value in expected.items():
                error = (state[name].double() - value.double()).abs().max().item()
                assert error < 1e-10, f"{name} (wrap_first={wrap_first}): max abs error {error:.3g}"
    # Training moved the parameters, so the comparison above compared something.
    assert (expected["0.weight"] - _small_net().state_dict()["0.weight"]).abs().max() > 1e-3
