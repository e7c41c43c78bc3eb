"""syncnorm under FSDP2 (``fully_shard``) and DeviceMesh, on CPU with gloo.

References are computed in one process with torch's BatchNorm: on the concatenation of every rank's
batch (FSDP over all ranks), or of each data-parallel group's batches (a 2-D mesh whose layers sync
over the ``dp`` dimension only).
"""

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6 has FSDP2 only under torch.distributed._composable
    fully_shard = None

needs_fsdp2 = pytest.mark.skipif(
    fully_shard is None,
    reason=f"torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6 (this is {torch.__version__})")

C_IN, C_MID = 3, 4


def make_model(dtype=torch.float64):
    """BatchNorm first (its input is the data, so a mixed-precision reference can reproduce it), then a
    conv and a second BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(C_IN), nn.Conv2d(C_IN, C_MID, 3, padding=1), nn.BatchNorm2d(C_MID),
                          nn.ReLU()).to(dtype)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return model


def global_batch(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-2.0, 3.0, C_IN).view(1, -1, 1, 1)
    x = torch.randn(sum(sizes), C_IN, 5, 5, generator=generator, dtype=torch.float64) * 2 + offsets
    weights = torch.randn(sum(sizes), C_MID, 5, 5, generator=generator, dtype=torch.float64)
    return x, weights


def _slice(tensor, sizes, index):
    start = sum(sizes[:index])
    return tensor[start : start + sizes[index]]


def reference(x, weights, dtype=torch.float64):
    """Plain BatchNorm model on ``x`` in one process: output, the two layers' running statistics, and
    the gradients of ``sum(output * weights)`` w.r.t. the parameters."""
    model = make_model(dtype)
    x = x.to(dtype).requires_grad_()
    out = model(x)
    (out * weights.to(dtype)).sum().backward()
    return {"out": out.detach(), "input_grad": x.grad,
            "stats": [(model[i].running_mean.clone(), model[i].running_var.clone()) for i in (0, 2)],
            "grads": [p.grad.clone() for p in model.parameters()]}


def _full(tensor):
    """A DTensor's full value (FSDP2 shards parameters and gradients), a tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _fsdp_step(rank, world_size, sizes, mixed):
    model = syncnorm.convert_sync_batchnorm(make_model(torch.float32 if mixed else torch.float64))
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)} if mixed else {}
    fully_shard(model, **kwargs)
    first = []
    model[0].register_forward_hook(lambda layer, args, output: first.append(output.detach()))
    x, weights = global_batch(sizes)
    x = _slice(x, sizes, rank).to(torch.float32 if mixed else torch.float64).requires_grad_()
    out = model(x)
    (out * _slice(weights, sizes, rank).to(out.dtype)).sum().backward()
    return {"out": out.detach(), "input_grad": x.grad, "first": first[0],
            "stats": [(model[i].running_mean.clone(), model[i].running_var.clone()) for i in (0, 2)],
            "grads": [_full(p.grad).clone() for p in model.parameters()],
            "param_dtype": _full(model[0].weight).dtype}


@needs_fsdp2
def test_fully_shard_equals_batchnorm_on_global_batch():
    """float64: outputs, input gradients, running statistics and parameter gradients at 1e-10. FSDP2
    averages gradients over ranks (reduce-scatter), so the sum over ranks is the mean times 2."""
    sizes = [3, 5]
    per_rank = run_ranks(_fsdp_step, 2, sizes, False, timeout=180)
    x, weights = global_batch(sizes)
    ref = reference(x, weights)
    out = torch.cat([r["out"] for r in per_rank])
    assert torch.allclose(out, ref["out"], rtol=0, atol=1e-10)
    assert torch.allclose(torch.cat([r["input_grad"] for r in per_rank]), ref["input_grad"], rtol=0, atol=1e-10)
    for r in per_rank:
        for (mean, var), (ref_mean, ref_var) in zip(r["stats"], ref["stats"]):
            assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-10)
            assert torch.allclose(var, ref_var, rtol=0, atol=1e-10)
        for grad, ref_grad in zip(r["grads"], ref["grads"]):
            assert torch.allclose(grad * len(sizes), ref_grad, rtol=0, atol=1e-10)


@pytest.mark.slow
@needs_fsdp2
def test_fully_shard_mixed_precision_bf16_params():
    """``MixedPrecisionPolicy(param_dtype=bfloat16)``: FSDP casts the input and the gathered parameters to
    bfloat16; the running buffers are not parameters and stay float32, and syncnorm accumulates the
    statistics of a bfloat16 input in float32. So the running statistics of the first layer (whose input
    is the data) equal float32 BatchNorm on the bfloat16-rounded global batch to float32 rounding
    (1e-5 relative), and its output is within bfloat16 rounding of it (2^-7 relative: 1-2 ulps)."""
    sizes = [4, 4]
    per_rank = run_ranks(_fsdp_step, 2, sizes, True, timeout=180)
    x, weights = global_batch(sizes)
    # What the first layer sees: the bf16-rounded input and bf16-rounded weight and bias, in float32.
    layer = make_model(torch.float32)[0]
    with torch.no_grad():
        layer.weight.copy_(layer.weight.bfloat16().float())
        layer.bias.copy_(layer.bias.bfloat16().float())
        expected_out = layer(x.bfloat16().float())
    for r in per_rank:
        assert r["param_dtype"] == torch.float32  # the stored (sharded) parameters keep their dtype
        mean, var = r["stats"][0]
        assert mean.dtype == var.dtype == torch.float32
        assert torch.allclose(mean, layer.running_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(var, layer.running_var, rtol=1e-5, atol=1e-6)
        assert r["stats"][1][0].dtype == torch.float32
    first = torch.cat([r["first"] for r in per_rank])
    assert first.dtype == torch.bfloat16
    error = (first.float() - expected_out).abs()
    assert (error <= 2.0 ** -7 * expected_out.abs().clamp_min(1.0)).all(), error.max()
    assert not torch.equal(first.float(), expected_out)  # bf16 output: the bound is what is tested


def _mesh_2d(rank, world_size, sizes, precise_batches):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"]
    model = syncnorm.convert_sync_batchnorm(make_model(), process_group=dp)
    fully_shard(model, mesh=dp)
    x, weights = global_batch(sizes)
    x = _slice(x, sizes, rank).requires_grad_()
    out = model(x)
    (out * _slice(weights, sizes, rank)).sum().backward()
    stats = [(model[i].running_mean.clone(), model[i].running_var.clone()) for i in (0, 2)]
    try:
        syncnorm.SyncBatchNorm(3, process_group=mesh)
        error = None
    except ValueError as caught:
        error = str(caught)
    # Precise BN over the dp dimension, FSDP-sharded model, ranks with different numbers of batches.
    batches = [x.detach()[: 1 + i % 2] for i in range(precise_batches[rank])]
    syncnorm.update_bn_stats(model, batches, process_group=dp)
    precise = [(model[i].running_mean.clone(), model[i].running_var.clone()) for i in (0, 2)]
    return {"out": out.detach(), "stats": stats, "error": error, "batches": batches, "precise": precise,
            "dp_ranks": torch.distributed.get_process_group_ranks(dp.get_group())}


@pytest.mark.slow
@needs_fsdp2
def test_2d_mesh_syncs_over_dp_dimension_only():
    """4 ranks, mesh (dp=2, tp=2): the layers sync over ``mesh["dp"]`` (ranks {0, 2} and {1, 3}), so each
    dp group equals BatchNorm on its own ranks' concatenation. Then ``update_bn_stats`` over the dp
    dimension of the FSDP-sharded model, ranks with 3, 1, 2 and 0 batches, against the pooled values of
    each dp group's batches run in one process as the synced pass runs them (step by step)."""
    sizes = [2, 3, 4, 2]
    precise_batches = [3, 1, 2, 0]
    per_rank = run_ranks(_mesh_2d, 4, sizes, precise_batches, timeout=300, pg_timeout=60)
    x, weights = global_batch(sizes)
    assert "pass the data-parallel dimension" in per_rank[0]["error"] and "mesh[\"dp\"]" in per_rank[0]["error"]
    for members in ([0, 2], [1, 3]):
        assert all(per_rank[r]["dp_ranks"] == members for r in members)
        group_x = torch.cat([_slice(x, sizes, r) for r in members])
        group_w = torch.cat([_slice(weights, sizes, r) for r in members])
        ref = reference(group_x, group_w)
        out = torch.cat([per_rank[r]["out"] for r in members])
        assert torch.allclose(out, ref["out"], rtol=0, atol=1e-10)
        for r in members:
            for (mean, var), (ref_mean, ref_var) in zip(per_rank[r]["stats"], ref["stats"]):
                assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-10)
                assert torch.allclose(var, ref_var, rtol=0, atol=1e-10)
        # Precise BN reference: step i runs the concatenation of the members' i-th batches.
        model = make_model()
        seen = {0: [], 2: []}
        for index in seen:
            model[index].register_forward_pre_hook(
                lambda layer, args, index=index: seen[index].append(
                    args[0].transpose(0, 1).reshape(args[0].size(1), -1)))
        steps = max(precise_batches[r] for r in members)
        with torch.no_grad():
            for i in range(steps):
                model(torch.cat([per_rank[r]["batches"][i] for r in members if i < precise_batches[r]]))
        for r in members:
            for (mean, var), index in zip(per_rank[r]["precise"], (0, 2)):
                values = torch.cat(seen[index], 1)
                assert torch.allclose(mean, values.mean(1), rtol=0, atol=1e-10)
                assert torch.allclose(var, values.var(1), rtol=0, atol=1e-10)
                assert torch.equal(mean, per_rank[members[0]]["precise"][(0, 2).index(index)][0])


def _mesh_1d(rank, world_size, counts_sizes):
    from torch.distributed.device_mesh import init_device_mesh

    from test_precise import _record, make_model as precise_model, rank_batches

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    model = syncnorm.convert_sync_batchnorm(precise_model(), process_group=mesh)
    assert all(layer.process_group is mesh.get_group() for layer in model.modules()
               if isinstance(layer, syncnorm.SyncBatchNorm))
    syncnorm.update_bn_stats(model, [x for x, _ in rank_batches(rank, counts_sizes)], process_group=mesh["dp"])
    # The functional form with a mesh dimension: this rank's rows of BatchNorm on both ranks' inputs.
    x, _ = global_batch([2, 3], seed=4)
    out = syncnorm.sync_batch_norm(_slice(x, [2, 3], rank), torch.zeros(C_IN, dtype=torch.float64),
                                   torch.ones(C_IN, dtype=torch.float64), training=True, process_group=mesh["dp"])
    return _record(model) | {"calls": [(i + 1, None) for i in range(len(counts_sizes[rank]))], "functional": out}


@needs_fsdp2
def test_1d_mesh_convert_functional_and_precise_bn():
    """``convert_sync_batchnorm(model, process_group=mesh)`` and ``update_bn_stats(..., mesh["dp"])`` with
    uneven batches (the pooled reference of test_precise), and ``sync_batch_norm(..., mesh["dp"])``
    (BatchNorm on the concatenation)."""
    from test_precise import check

    sizes = [[3, 2], [4]]
    per_rank = run_ranks(_mesh_1d, 2, sizes, timeout=180)
    check(per_rank, sizes, True)
    x, _ = global_batch([2, 3], seed=4)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert torch.allclose(torch.cat([r["functional"] for r in per_rank]), expected, rtol=0, atol=1e-10)
