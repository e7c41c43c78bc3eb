"""SyncBatchNorm on several gloo ranks equals BatchNorm on the concatenated global batch."""

import pytest
import torch

import syncnorm
from syncnorm.testing import run_ranks
from reference import compare, make_case, run_cases_on_rank, run_layer_on_rank

SHAPES = {
    "(N,C)": (0, 5),
    "(N,C,L)": (0, 4, 7),
    "(N,C,H,W)": (0, 3, 5, 4),
    "(N,C,D,H,W)": (0, 2, 3, 4, 3),
}


def _cases(world_size, dtype):
    uneven = [[3, 5, 2][:world_size], [4, 1, 6][:world_size], [2, 2, 2][:world_size]]
    cases = [make_case(shape, uneven, dtype=dtype) for shape in SHAPES.values()]
    cases.append(make_case(SHAPES["(N,C,H,W)"], uneven, dtype=dtype, channels_last=True))
    cases.append(make_case(SHAPES["(N,C,D,H,W)"], uneven, dtype=dtype, channels_last=True))
    return cases


# "host": eager CPU reads the gathered counts back to Python; "device": the path CUDA tensors and
# torch.compile take (counts, totals and checks stay on the device), run here eagerly on CPU.
PATHS = ["host", "device"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_float64_matches_batchnorm_on_global_batch(world_size, path):
    cases = _cases(world_size, torch.float64)
    results = run_ranks(run_cases_on_rank, world_size, cases, path)
    for index, case in enumerate(cases):
        per_rank = [rank_results[index] for rank_results in results]
        compare(case, per_rank, rel=1e-10)
        # channels_last in, channels_last out (and the same dtype and strides in every case)
        assert all(all(rank["formats_kept"]) for rank in per_rank)


def test_float32_matches_batchnorm_on_global_batch():
    cases = _cases(2, torch.float32)
    for case in cases:
        case.module_dtype = torch.float32
    results = run_ranks(run_cases_on_rank, 2, cases)
    for index, case in enumerate(cases):
        compare(case, [rank_results[index] for rank_results in results], rel=1e-5)


def _shifted_case(sizes, rank_offsets, dtype, **fields):
    """Global batches whose rank slices have very different means."""
    case = make_case((0, 3, 4), sizes, dtype=dtype, **fields)
    for x, step_sizes in zip(case.inputs, case.sizes):
        start = 0
        for size, offset in zip(step_sizes, rank_offsets):
            x[start : start + size] += offset
            start += size
    return case


@pytest.mark.parametrize("path", PATHS)
def test_uneven_batches_single_samples_and_an_empty_rank(path):
    # step 0: one sample per rank; step 1: rank 1 is empty; step 2: rank 0 is empty
    sizes = [[1, 1, 1], [5, 0, 2], [0, 3, 1]]
    cases = [
        _shifted_case(sizes, [100.0, -50.0, 0.0], torch.float64),
        make_case((0, 6), sizes, dtype=torch.float64, kwargs={"momentum": None}),
    ]
    results = run_ranks(run_cases_on_rank, 3, cases, path)
    for index, case in enumerate(cases):
        per_rank = [rank_results[index] for rank_results in results]
        compare(case, per_rank, rel=1e-10)
        assert per_rank[1]["outputs"][1].shape[0] == 0


def test_float32_statistics_stay_exact_when_mean_dwarfs_std():
    # mean 1000, std 1: E[x^2] - E[x]^2 in float32 would be off by ~6% of the variance here.
    sizes = [[16, 48], [40, 24]]
    case32 = make_case((0, 3, 4), sizes, dtype=torch.float32, module_dtype=torch.float32)
    case32.inputs = [torch.randn_like(x) + 1000.0 for x in case32.inputs]
    rank_results = run_ranks(run_layer_on_rank, 2, case32)
    # The reference: float64 BatchNorm on the very same float32 values.
    case64 = make_case((0, 3, 4), sizes, dtype=torch.float64)
    case64.inputs = [x.double() for x in case32.inputs]
    case64.grads = [g.double() for g in case32.grads]
    # Outputs carry float32 rounding of x * alpha + beta at |x| = 1000, as native BatchNorm's do.
    compare(case64, rank_results, rel=1e-3, buffer_rel=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_affine_running_stats_momentum_and_eval_options(path):
    sizes = [[3, 5], [6, 2]]
    eval_batch = torch.randn(8, 4, 3, dtype=torch.float64) * 2 + 1
    cases = [
        make_case((0, 4, 3), sizes, kwargs={"affine": False}, eval_input=eval_batch),
        make_case((0, 4, 3), sizes, kwargs={"momentum": None}, eval_input=eval_batch),
        make_case((0, 4, 3), sizes, kwargs={"momentum": 0.5, "eps": 1e-3}, eval_input=eval_batch),
        make_case((0, 4, 3), sizes, kwargs={"track_running_stats": False}),
    ]
    results = run_ranks(run_cases_on_rank, 2, cases, path)
    for index, case in enumerate(cases):
        compare(case, [rank_results[index] for rank_results in results], rel=1e-10)


def _eval_without_running_stats(rank, world_size):
    """Eval mode with track_running_stats=False normalizes with the local batch, like torch's SyncBN."""
    from torch.profiler import ProfilerActivity, profile

    import syncnorm

    layer = syncnorm.SyncBatchNorm(3, track_running_stats=False).double().eval()
    x = torch.randn(4 + rank, 3, 5, dtype=torch.float64) + rank
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = layer(x)
    expected = torch.nn.BatchNorm1d(3, track_running_stats=False).double().eval()(x)
    return (y - expected).abs().max().item(), _collectives(prof)


def test_eval_mode_never_syncs():
    for error, collectives in run_ranks(_eval_without_running_stats, 2):
        assert error < 1e-12
        assert collectives == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype, path):
    sizes = [[6, 10], [9, 7]]
    cases = [
        make_case((0, 3, 4, 4), sizes, dtype=dtype, module_dtype=torch.float32),
        make_case((0, 3, 4, 4), sizes, dtype=dtype, module_dtype=torch.float32, channels_last=True),
    ]
    results = run_ranks(run_cases_on_rank, 2, cases, path)
    output_rel = 4e-3 if dtype == torch.float16 else 3e-2
    for index, case in enumerate(cases):
        per_rank = [rank_results[index] for rank_results in results]
        # The output is rounded to the input's dtype; the statistics, accumulated in float32, match
        # a float32 BatchNorm on the same values to float32 precision.
        compare(case, per_rank, rel=output_rel, buffer_rel=1e-5)
        assert all(all(rank["formats_kept"]) for rank in per_rank)
        assert all(rank["outputs"][0].dtype == dtype for rank in per_rank)


def test_process_groups_sync_only_within_their_group():
    groups = [[0, 2], [1, 3]]
    cases = [make_case((0, 3, 5), [[2, 6]], seed=seed) for seed in (1, 2)]
    results = run_ranks(_run_in_groups, 4, groups, cases)
    for group, case in zip(groups, cases):
        compare(case, [results[rank] for rank in group], rel=1e-10)


def _run_in_groups(rank, world_size, groups, cases):
    mine = next(i for i, ranks in enumerate(groups) if rank in ranks)
    return run_layer_on_rank(rank, world_size, cases[mine], group_ranks=groups)


def _collectives(prof) -> int:
    """Number of c10d collectives the profiler saw (counted by torch, not by syncnorm)."""
    return sum(1 for event in prof.events() if event.name.startswith("c10d::"))


def _count_collectives(rank, world_size):
    from torch.profiler import ProfilerActivity, profile

    import syncnorm

    model = syncnorm.convert_sync_batchnorm(
        torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4),
        )
    )
    x = torch.randn(3, 2, 7, 7)
    counts = {}
    for step in ("first", "second"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = model(x)
        counts[f"{step} forward"] = _collectives(prof)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y.sum().backward()
        counts[f"{step} backward"] = _collectives(prof)
    model.eval()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    counts["eval forward"] = _collectives(prof)
    # A group of one rank: nothing to exchange.
    own_group = [torch.distributed.new_group([r]) for r in range(world_size)][rank]
    alone = syncnorm.SyncBatchNorm(2, process_group=own_group)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        alone(x).sum().backward()
    counts["group of one"] = _collectives(prof)
    counts["group of one matches BatchNorm"] = bool(
        torch.allclose(alone(x), torch.nn.BatchNorm2d(2)(x), atol=1e-6)
    )
    return counts


def test_one_collective_in_forward_and_one_in_backward_per_layer():
    for counts in run_ranks(_count_collectives, 2):
        assert counts == {
            "first forward": 3,  # one width request (the group's first layer of 4 channels) + a gather each
            "first backward": 2,
            "second forward": 2,
            "second backward": 2,
            "eval forward": 0,
            "group of one": 0,
            "group of one matches BatchNorm": True,
        }


def _half_input_grad(rank, world_size, x, dy, first, path):
    from reference import use_path

    use_path(path)
    layer = syncnorm.SyncBatchNorm(x.size(1))
    mine = slice(0, first) if rank == 0 else slice(first, None)
    local_x = x[mine].clone().requires_grad_()
    layer(local_x).backward(dy[mine])
    return local_x.grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_gradient_is_rounded_once(dtype, path):
    # The reference: float32 BatchNorm's input gradient on the same values, rounded once to the
    # input dtype (what nn.BatchNorm2d itself returns for a half input). Rounding a half partial
    # result and then the sum again is 1 ulp off on 3-5% of these elements.
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 3, 8, 8, generator=generator) * 3 + 1).to(dtype)
    dy = torch.randn(16, 3, 8, 8, generator=generator).to(dtype)
    grads = torch.cat(run_ranks(_half_input_grad, 2, x, dy, 6, path))
    reference = torch.nn.BatchNorm2d(3)
    x32 = x.float().requires_grad_()
    reference(x32).backward(dy.float())
    once_rounded = x32.grad.to(dtype)
    assert grads.dtype == dtype
    mismatch = (grads != once_rounded).float().mean().item()
    assert mismatch <= 0.005, f"{mismatch:.1%} of the elements differ from the once-rounded gradient"
