"""Bad input fails with a clear error on every rank, never a hang or a crash inside gloo."""

import pytest
import torch

import syncnorm
from syncnorm.testing import run_ranks
from reference import use_path


def _expect_errors(rank, world_size, scenario, path):
    """Run ``scenario`` on this rank; return the error's type and message, then prove the group still works.

    On the device path (CUDA tensors, torch.compile) the checks that need another rank's values are
    on-device asserts, which raise RuntimeError on CPU; the rest is ValueError on either path.
    """
    use_path(path)
    layer, x = scenario(rank)
    with pytest.raises((ValueError, RuntimeError)) as error:
        layer(x)
    # Every rank stopped at the same point, so the group is still usable afterwards.
    healthy = syncnorm.SyncBatchNorm(2)
    healthy(torch.randn(3, 2)).sum().backward()
    return f"{type(error.value).__name__}: {error.value}"


def _1d_everywhere(rank):
    return syncnorm.SyncBatchNorm(3), torch.randn(4)


def _1d_on_rank_1(rank):
    return syncnorm.SyncBatchNorm(3), torch.randn(4) if rank == 1 else torch.randn(4, 3)


def _wrong_channels_on_rank_0(rank):
    return syncnorm.SyncBatchNorm(3), torch.randn(4, 5, 2) if rank == 0 else torch.randn(4, 3, 2)


def _one_value_per_channel(rank):
    return syncnorm.SyncBatchNorm(3), torch.randn(1 if rank == 0 else 0, 3)


def _different_models(rank):
    channels = 3 if rank == 0 else 4
    return syncnorm.SyncBatchNorm(channels), torch.randn(5, channels, 2)


INVALID_ELSEWHERE = {"host": "ValueError: SyncBatchNorm got an invalid input on rank(s) {}",
                     "device": "RuntimeError: SyncBatchNorm got an invalid input on another rank"}
ONE_VALUE = {"host": "ValueError: Expected more than 1 value per channel when training",
             "device": "RuntimeError: Expected more than 1 value per channel when training"}


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize(
    "scenario, expected",
    [
        (_1d_everywhere, ["ValueError: SyncBatchNorm expected at least 2D input (got 1D input)"] * 2),
        (_1d_on_rank_1, [INVALID_ELSEWHERE, "ValueError: SyncBatchNorm expected at least 2D input (got 1D input)"]),
        (_wrong_channels_on_rank_0, ["ValueError: SyncBatchNorm expected input with 3 channels", INVALID_ELSEWHERE]),
        (_one_value_per_channel, [ONE_VALUE] * 2),
        (_different_models, ["ValueError: SyncBatchNorm expected the same num_features on every rank "
                             "(got rank 0: 3, rank 1: 4)"] * 2),
    ],
    ids=["1D-input", "1D-input-on-one-rank", "wrong-channels-on-one-rank", "one-value", "different-models"],
)
def test_bad_input_raises_on_every_rank(scenario, expected, path):
    messages = run_ranks(_expect_errors, 2, scenario, path, pg_timeout=20.0)
    bad_rank = {_1d_on_rank_1: 1, _wrong_channels_on_rank_0: 0}.get(scenario)
    for rank, (message, fragment) in enumerate(zip(messages, expected)):
        if isinstance(fragment, dict):
            fragment = fragment[path].format(bad_rank)
        assert fragment in message, f"rank {rank}: {message!r}"


def _all_empty(rank, world_size, path):
    use_path(path)
    layer = syncnorm.SyncBatchNorm(3)
    before = {name: buf.clone() for name, buf in layer.named_buffers()}
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    reference = torch.nn.BatchNorm1d(3)
    reference(torch.randn(0, 3, 4))
    return {
        "shape": tuple(y.shape),
        "finite grads": all(torch.isfinite(t).all().item() for t in (x.grad, layer.weight.grad, layer.bias.grad)),
        "zero param grads": bool((layer.weight.grad == 0).all() and (layer.bias.grad == 0).all()),
        "running stats untouched": all(
            torch.equal(before[name], buf) for name, buf in layer.named_buffers() if name != "num_batches_tracked"
        ),
        "num_batches_tracked as BatchNorm": layer.num_batches_tracked.item() == reference.num_batches_tracked.item(),
    }


@pytest.mark.parametrize("path", ["host", "device"])
def test_all_empty_global_batch_is_not_an_error(path):
    for result in run_ranks(_all_empty, 2, path):
        assert result == {
            "shape": (0, 3, 4),
            "finite grads": True,
            "zero param grads": True,
            "running stats untouched": True,
            "num_batches_tracked as BatchNorm": True,
        }


def test_local_errors_without_a_process_group():
    layer = syncnorm.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match=r"expected input with 3 channels in dimension 1 \(got input of shape \[2, 4\]\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected a floating-point input"):
        layer(torch.ones(2, 3, dtype=torch.int64))
