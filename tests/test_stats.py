"""The math of stats.py in one process, against closed forms computed another way."""

import pytest
import torch

from syncnorm import stats


def _pieces(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    # different sizes, means and spreads per piece, one piece empty
    return [
        torch.randn(n, 4, 3, generator=generator, dtype=torch.float64).mul(scale).add(shift).to(dtype)
        for n, shift, scale in [(5, 100.0, 0.5), (0, 0.0, 1.0), (1, -3.0, 1.0), (9, 0.0, 4.0)]
    ]


def test_combined_statistics_equal_those_of_the_concatenation():
    pieces = _pieces()
    no_tail = torch.zeros(0, dtype=torch.float64)
    gathered = torch.stack([stats.pack_synced(*stats.local_stats(p), no_tail) for p in pieces])
    mean, var = stats.combine_stats(*stats.unpack_synced(gathered, 4))
    whole = torch.cat(pieces)
    torch.testing.assert_close(mean, whole.mean(dim=(0, 2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, whole.var(dim=(0, 2), unbiased=False), rtol=0, atol=1e-11)


def test_empty_input_has_zero_count_and_finite_statistics():
    count, mean, var = stats.local_stats(torch.empty(0, 3, 2))
    assert count == 0 and torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_statistics_accumulate_in_float32(dtype):
    x = (torch.randn(64, 3, 8, 8) + 10).to(dtype)
    count, mean, var = stats.local_stats(x)
    assert mean.dtype == var.dtype == torch.float32 and count == 64 * 64
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), exact.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=0)


def test_backward_pieces_match_autograd_of_batchnorm():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 5, 2, dtype=torch.float64, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    dy = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    weight = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    eps = 1e-5
    count, mean, var = stats.local_stats(x)
    invstd = torch.rsqrt(var + eps)

    sum_dy, grad_weight = stats.grad_sums_scaled(dy, x, mean, var, eps)
    torch.testing.assert_close(sum_dy, dy.sum(dim=(0, 2, 3)), rtol=0, atol=1e-12)
    x_hat = (x - mean.view(1, 3, 1, 1)) * invstd.view(1, 3, 1, 1)
    torch.testing.assert_close(grad_weight, (dy * x_hat).sum(dim=(0, 2, 3)), rtol=0, atol=1e-12)

    scales = stats.input_grad_scales(x, var, eps, weight, count)
    grad_input = stats.input_grad_from_sums(dy, x, mean, var, eps, scales, torch.cat([sum_dy, grad_weight]))
    x_leaf = x.clone().requires_grad_()
    torch.nn.functional.batch_norm(x_leaf, None, None, weight, None, True, 0.0, eps).backward(dy)
    torch.testing.assert_close(grad_input, x_leaf.grad, rtol=0, atol=1e-12)
    assert grad_input.is_contiguous(memory_format=torch.channels_last)
