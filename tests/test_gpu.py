"""CUDA/NCCL: exactness, no host synchronization, CUDA-graph capture. Runs only with >= 2 CUDA devices.

On a machine without them every test here is skipped with the reason (``pytest -ra`` shows it); the CPU
proof that the synced step has no host read is ``fullgraph=True`` in test_compile.py.
"""

import copy

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks
from reference import compare, make_case, run_layer_on_rank

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(
    GPUS < 2 or not torch.distributed.is_nccl_available(),
    reason=f"needs 2 CUDA devices and NCCL (found {GPUS} CUDA device(s))",
)


def _model():
    torch.manual_seed(0)
    return syncnorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    )


def _batch(rank, device):
    generator = torch.Generator().manual_seed(rank)
    return (torch.randn(3 + 2 * rank, 3, 9, 9, generator=generator) * 2 + 1).to(device)


def _layer_on_gpu(rank, world_size, case):
    torch.cuda.set_device(rank)
    return run_layer_on_rank(rank, world_size, case, device=f"cuda:{rank}")


def test_nccl_matches_batchnorm_on_the_global_batch():
    case = make_case((0, 3, 5, 4), [[3, 5], [1, 6], [4, 0]], dtype=torch.float64)
    compare(case, run_ranks(_layer_on_gpu, 2, case, backend="nccl"), rel=1e-10)


def _step_without_host_sync(rank, world_size):
    torch.cuda.set_device(rank)
    model = _model().cuda()
    x = _batch(rank, "cuda")
    model(x).sum().backward()  # warm-up: the one-time num_features check reads on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True


def test_synced_training_step_never_synchronizes_with_the_host():
    assert run_ranks(_step_without_host_sync, 2, backend="nccl") == [True, True]


def _captured_step(rank, world_size):
    torch.cuda.set_device(rank)
    model = _model().cuda()
    static_x = _batch(rank, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.sum().backward()

    # Replay on new data from a known state; an eager copy from the same state is the reference.
    static_x.copy_(_batch(rank, "cuda") * 0.5 - 1)
    reference = copy.deepcopy(model)
    graph.replay()
    reference.zero_grad(set_to_none=True)
    expected_y = reference(static_x)
    expected_y.sum().backward()
    torch.cuda.synchronize()
    worst = (static_y - expected_y).abs().max().item()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        worst = max(worst, (p.grad - q.grad).abs().max().item())
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        worst = max(worst, (b.double() - c.double()).abs().max().item())
    return worst


def test_synced_step_captures_in_a_cuda_graph():
    for rank, worst in enumerate(run_ranks(_captured_step, 2, backend="nccl")):
        assert worst < 1e-5, f"rank {rank}: replayed graph differs from eager by {worst:g}"
