"""``update_bn_stats`` against the pooled statistics computed in one process.

The reference runs a plain-BatchNorm copy of the model in one process, in the state the pass runs it
in (training mode, no gradients), on what each layer saw: for a plain model every rank's batches one
by one (each normalizes with its own batch), for a synced model each step's concatenation of the ranks'
batches (a synced layer normalizes with that global batch). Forward pre-hooks keep every value that
enters each BatchNorm layer; the expected statistics are ``mean`` and ``var(unbiased=True)`` of all of
them together, in float64. Nothing here comes from syncnorm's own combination code.
"""

import copy

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks

CHANNELS = (3, 4, 5)


def make_model(momentum=0.1) -> nn.Module:
    """Conv -> BN2d -> conv -> BN2d -> linear -> BN1d, deterministic non-trivial weights, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, padding=1), nn.BatchNorm2d(CHANNELS[1], momentum=momentum),
        nn.ReLU(), nn.Conv2d(CHANNELS[1], CHANNELS[2], 1), nn.BatchNorm2d(CHANNELS[2], momentum=momentum),
        nn.Flatten(), nn.Linear(CHANNELS[2] * 16, 6), nn.BatchNorm1d(6, momentum=momentum),
    ).double()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
                layer.running_mean.fill_(7.0)  # values the pass must replace
                layer.running_var.fill_(3.0)
                layer.num_batches_tracked.fill_(11)
    return model


def rank_batches(rank, counts_sizes, seed=1):
    """Every rank's list of ``(input, label)`` batches; ``counts_sizes[rank]`` lists its batch sizes.
    Channels get different offsets and scales, so a wrong pooling shows."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-2.0, 3.0, CHANNELS[0]).view(1, -1, 1, 1)
    every = []
    for sizes in counts_sizes:
        every.append([(torch.randn(size, CHANNELS[0], 4, 4, generator=generator, dtype=torch.float64) * (1 + r)
                       + offsets, torch.zeros(size)) for r, size in enumerate(sizes)])
    return every if rank is None else every[rank]


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def pooled_reference(steps):
    """Mean and unbiased variance of every value entering each BatchNorm layer when a plain copy of
    the model runs ``steps`` (a list of inputs) in training mode."""
    model = make_model()
    seen = {id(layer): [] for layer in bn_layers(model)}

    def keep(layer, args):
        x = args[0]
        seen[id(layer)].append(x.transpose(0, 1).reshape(x.size(1), -1).clone())

    for layer in bn_layers(model):
        layer.register_forward_pre_hook(keep)
    model.train()
    with torch.no_grad():
        for x in steps:
            model(x)
    result = []
    for layer in bn_layers(model):
        values = torch.cat(seen[id(layer)], 1)
        result.append((values.mean(1), values.var(1, unbiased=True)))
    return result


def _record(model):
    return {
        "stats": [(layer.running_mean.clone(), layer.running_var.clone()) for layer in bn_layers(model)],
        "tracked": [int(layer.num_batches_tracked) for layer in bn_layers(model)],
        "modes": [m.training for m in model.modules()],
        "momenta": [layer.momentum for layer in bn_layers(model)],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _precise_on_rank(rank, world_size, counts_sizes, synced, wrap, num_batches, eval_mode):
    model = make_model()
    if synced:
        model = syncnorm.convert_sync_batchnorm(model)
    if eval_mode:
        model.eval()
        model[1].train()  # a mixed state, to check each module's own flag comes back
    net = nn.parallel.DistributedDataParallel(model) if wrap else model
    calls = []
    syncnorm.update_bn_stats(net, rank_batches(rank, counts_sizes), num_batches=num_batches,
                             progress=lambda done, total: calls.append((done, total)))
    record = _record(model)
    record["calls"] = calls
    return record


def _steps_for(counts_sizes, synced, num_batches=None):
    """What the pass feeds the layers: each rank's batches (plain) or each step's concatenation (synced)."""
    every = [[x for x, _ in batches[:num_batches]] for batches in rank_batches(None, counts_sizes)]
    if not synced:
        return [x for batches in every for x in batches]
    longest = max(len(batches) for batches in every)
    return [torch.cat([batches[i] for batches in every if i < len(batches)]) for i in range(longest)]


def check(per_rank, counts_sizes, synced, num_batches=None, eval_mode=False):
    reference = pooled_reference(_steps_for(counts_sizes, synced, num_batches))
    before = _record(make_model())
    for rank, record in enumerate(per_rank):
        for index, ((mean, var), (ref_mean, ref_var)) in enumerate(zip(record["stats"], reference)):
            assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-10), (rank, index, mean - ref_mean)
            assert torch.allclose(var, ref_var, rtol=1e-10, atol=1e-10), (rank, index, var - ref_var)
            # Bitwise identical on every rank.
            assert torch.equal(mean, per_rank[0]["stats"][index][0]) and torch.equal(var, per_rank[0]["stats"][index][1])
        assert record["tracked"] == before["tracked"]
        assert record["momenta"] == before["momenta"]
        for param, expected in zip(record["params"], before["params"]):
            assert torch.equal(param, expected)
        expected_modes = [not eval_mode] * len(record["modes"])
        if eval_mode:
            expected_modes[2] = True  # model[1] (index 0 is the Sequential itself)
        assert record["modes"] == expected_modes
        mine = counts_sizes[rank][:num_batches]
        assert [done for done, _ in record["calls"]] == list(range(1, len(mine) + 1))


UNEVEN = [[4, 3, 5], [2, 6]]  # different numbers and sizes of batches


@pytest.mark.parametrize("synced", [False, True], ids=["plain", "synced"])
def test_uneven_batches_equal_pooled_reference(synced):
    per_rank = run_ranks(_precise_on_rank, 2, UNEVEN, synced, False, None, False, timeout=180)
    check(per_rank, UNEVEN, synced)


def test_ddp_wrapped_synced_eval_mode_restored():
    sizes = [[3, 4], [5, 2]]
    per_rank = run_ranks(_precise_on_rank, 2, sizes, True, True, None, True, timeout=180)
    check(per_rank, sizes, True, eval_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("synced", [False, True], ids=["plain", "synced"])
def test_three_ranks_one_without_batches_and_num_batches(synced):
    sizes = [[4, 3, 5, 2], [], [2, 6, 3]]
    per_rank = run_ranks(_precise_on_rank, 3, sizes, synced, True, 2, False, timeout=240)
    check(per_rank, sizes, synced, num_batches=2)


def test_one_process_matches_reference_and_restores_on_error():
    """Without a process group: the pooled statistics of this process's batches; a failing batch leaves
    the model exactly as it was."""
    model = make_model()
    sizes = [[4, 3, 5]]
    calls = []
    syncnorm.update_bn_stats(model, rank_batches(0, sizes), progress=lambda d, t: calls.append(d))
    check([_record(model) | {"calls": [(d, None) for d in calls]}], sizes, False)

    # torch's own SyncBatchNorm class (it runs as BatchNorm without a process group; with one it needs GPUs).
    model = make_model()
    torch_sync = nn.SyncBatchNorm(CHANNELS[1]).double()
    torch_sync.load_state_dict(model[1].state_dict())
    model[1] = torch_sync
    syncnorm.update_bn_stats(model, rank_batches(0, sizes), progress=True)
    check([_record(model) | {"calls": [(d, None) for d in calls]}], sizes, False)

    model = make_model()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    bad = rank_batches(0, sizes) + [(torch.zeros(2, 7, 4, 4, dtype=torch.float64), None)]
    with pytest.raises(RuntimeError):
        syncnorm.update_bn_stats(model, bad)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="num_batches"):
        syncnorm.update_bn_stats(model, [], num_batches=-1)


def test_launcher_precise_bn_batches(tmp_path):
    """``train.precise_bn_batches: 3``: after the run, the BatchNorm buffers are the pooled statistics of
    the first 3 training batches of the last epoch under the final weights (one process, local BN)."""
    pytest.importorskip("yaml")
    pytest.importorskip("rich")
    from syncnorm.train.config import from_dict
    from syncnorm.train.data import build_datasets, make_loaders
    from syncnorm.train.loop import train
    from syncnorm.train.ui import Reporter

    def run(precise, out):
        cfg = from_dict({
            "model": {"name": "lenet", "norm": "bn"},
            "data": {"name": "synthetic", "synthetic_samples": 128},
            "train": {"epochs": 1, "batch_size": 16, "max_steps": 2, "dtype": "float64", "seed": 5,
                      "precise_bn_batches": precise},
            "output_dir": str(tmp_path / out),
        })
        return cfg, train(cfg, reporter=Reporter(enabled=False)).model

    cfg, model = run(3, "on")
    data = build_datasets("synthetic", synthetic_samples=128, seed=5)
    loader, sampler, _ = make_loaders(data, batch_size=16, eval_batch_size=500, rank=0, world_size=1, seed=5)
    sampler.set_epoch(1)
    batches = [images.double() for images, _ in list(loader)[:3]]
    reference, seen = copy.deepcopy(model).train(), {}
    for layer in bn_layers(reference):
        layer.register_forward_pre_hook(
            lambda layer, args: seen.setdefault(id(layer), []).append(
                args[0].transpose(0, 1).reshape(args[0].size(1), -1)))
    with torch.no_grad():
        for x in batches:
            reference(x)
    layers = bn_layers(model)
    assert len(layers) >= 2
    for layer, ref_layer in zip(layers, bn_layers(reference)):
        values = torch.cat(seen[id(ref_layer)], 1)
        assert torch.allclose(layer.running_mean, values.mean(1), rtol=0, atol=1e-10)
        assert torch.allclose(layer.running_var, values.var(1), rtol=1e-10, atol=1e-10)
    _, off = run(0, "off")  # the moving averages of 2 steps: not the pooled statistics
    assert not torch.allclose(bn_layers(off)[0].running_var, layers[0].running_var, atol=1e-6)


def _subgroup_on_rank(rank, world_size, counts_sizes, synced):
    """Statistics pooled over ranks 0 and 1 of 3 (synced: the layers sync over them too); rank 2 is
    outside the group and passes it as well."""
    group = torch.distributed.new_group([0, 1])
    model = make_model()
    if synced:
        model = syncnorm.convert_sync_batchnorm(model, process_group=group)
    calls = []
    syncnorm.update_bn_stats(model, rank_batches(rank, counts_sizes), process_group=group,
                             progress=lambda done, total: calls.append((done, total)))
    return _record(model) | {"calls": calls}


@pytest.mark.parametrize("synced", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain", "synced"])
def test_rank_outside_the_process_group_keeps_its_model(synced):
    sizes = [[4, 3], [2, 6, 3], [5]]
    per_rank = run_ranks(_subgroup_on_rank, 3, sizes, synced, timeout=180, pg_timeout=20)
    check(per_rank[:2], sizes[:2], synced)  # the members: as if they were the only ranks
    outside, before = per_rank[2], _record(make_model())
    for (mean, var), (mean_before, var_before) in zip(outside["stats"], before["stats"]):
        assert torch.equal(mean, mean_before) and torch.equal(var, var_before)
    assert outside["tracked"] == before["tracked"] and outside["modes"] == before["modes"]
    assert len(outside["calls"]) == 1  # it ran its own batch


def _bad_input_on_rank(rank, world_size):
    model = syncnorm.convert_sync_batchnorm(make_model())
    batches = [x for x, _ in rank_batches(rank, [[2, 3], [2, 3]])]
    if rank == 1:
        batches[1] = {"image": batches[1]}  # not a tensor: no stand-in shape to copy
    try:
        syncnorm.update_bn_stats(model, batches)
    except TypeError as error:
        return str(error), model[1].running_mean.clone()
    return None, None


def test_bad_input_on_one_rank_raises_on_every_rank():
    (first, mean0), (second, mean1) = run_ranks(_bad_input_on_rank, 2, timeout=120, pg_timeout=20)
    assert "rank(s) 1" in first and "expected batches whose input is a tensor" in second
    assert torch.equal(mean0, make_model()[1].running_mean) and torch.equal(mean1, mean0)  # restored


class _ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)``: fails on a batch of 0 samples (the -1 is ambiguous)."""

    def forward(self, x):
        return x.view(x.size(0), -1)


def _no_empty_batch_on_rank(rank, world_size):
    model = syncnorm.convert_sync_batchnorm(make_model())
    model[5] = _ViewFlatten()
    batches = [x for x, _ in rank_batches(rank, [[2, 3], [4]])]
    try:
        syncnorm.update_bn_stats(model, batches)
    except ValueError as error:
        return str(error), int(model[1].num_batches_tracked)
    return None, None


def test_model_refusing_an_empty_batch_fails_on_every_rank():
    results = run_ranks(_no_empty_batch_on_rank, 2, timeout=120, pg_timeout=20)
    for message, tracked in results:
        assert message is not None and "accepts a batch of 0 samples" in message and "num_batches=" in message
        assert tracked == 11  # restored
