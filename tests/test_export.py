"""A model trained with syncnorm on 2 ranks, reverted, exports to ONNX and runs in onnxruntime.

The copy is reverted in the middle of training (``revert_sync_batchnorm`` copies by default), and the
training model must go on syncing: its statistics after one more step still equal one process
training plain BatchNorm on the concatenated batches.
"""

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks

PER_RANK = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.5), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=0.5),
    )


def _batch(step, rank):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(PER_RANK, 3, 8, 8, generator=generator) * (rank + 1) + rank


def _train_step(model, optimizer, x):
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _train_and_export_a_copy(rank, world_size):
    model = nn.parallel.DistributedDataParallel(syncnorm.convert_sync_batchnorm(_model()))
    # DDP looks for torch's class only: its logging says "no SyncBN" (docs/integrations.md).
    assert not model._get_ddp_logging_data().get("has_sync_bn", True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = _model()  # one process, plain BatchNorm, the concatenated batches
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):
        _train_step(model, optimizer, _batch(step, rank))
        _train_step(reference, reference_optimizer, torch.cat([_batch(step, r) for r in range(world_size)]))

    with pytest.raises(TypeError, match="pass ddp_model.module"):
        syncnorm.revert_sync_batchnorm(model)
    exported = syncnorm.revert_sync_batchnorm(model.module).eval()  # a copy: training goes on below

    _train_step(model, optimizer, _batch(2, rank))
    _train_step(reference, reference_optimizer, torch.cat([_batch(2, r) for r in range(world_size)]))
    assert [type(m) for m in model.module if isinstance(m, syncnorm.SyncBatchNorm)] == [syncnorm.SyncBatchNorm] * 2
    assert model.module[1].training and int(model.module[1].num_batches_tracked) == 3
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    return exported


def test_reverted_model_exports_to_onnx_and_matches_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the export test needs pip install -e '.[dev]'")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript: pip install -e '.[dev]'")
    plain = run_ranks(_train_and_export_a_copy, 2)[0]
    assert [type(m) for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        nn.BatchNorm2d, nn.BatchNorm1d]
    assert int(plain[1].num_batches_tracked) == 2 and not plain.training
    # Trained statistics, not the defaults: eval mode uses them, so the comparison below sees them.
    assert (plain[1].running_var - 1).abs().max() > 0.1 and plain[1].running_mean.abs().max() > 0.1

    example = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 + 1
    # The README's lines ("input": nn.Sequential's forward argument names the graph input):
    torch.onnx.export(plain, (example,), tmp_path / "model.onnx")
    (output,) = onnxruntime.InferenceSession(tmp_path / "model.onnx").run(None, {"input": example.numpy()})

    with torch.no_grad():
        expected = plain(example)
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-5, atol=1e-5)
