"""timm models through syncnorm's walkers: exact at 2 gloo ranks, reverted to the original, trained
under DDP.

The reference is the *original* timm model (BatchNormAct2d, BatchNorm2d) run in one process on the
concatenated global batch, in float64: the converted model's training-mode outputs and input
gradients must match slice by slice, its weight gradients summed over ranks and its running
statistics on every rank, to 1e-10 relative. Needs timm (the `dev` or `timm` extra): not a core file.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm.integrations.timm import SyncBatchNormAct2d  # noqa: E402
from syncnorm.testing import run_ranks  # noqa: E402

SIZES = [2, 3]  # uneven per-rank batches
STEPS = 2
TOLERANCE = 1e-10


class _HalfNegative(nn.Module):
    """A deterministic drop layer (timm's are random): halves the negative values, so that whether
    and where it runs shows in the output."""

    def forward(self, x):
        return torch.where(x < 0, x * 0.5, x)


class _TaggedBatchNormAct2d(BatchNormAct2d):
    """A BatchNormAct2d subclass that keeps timm's forward and adds a setting: converts through
    timm's registration and must come back as itself, with its setting."""

    def __init__(self, num_features, tag, **kwargs):
        super().__init__(num_features, **kwargs)
        self.tag = tag


def _variants():
    """Every way timm builds a BatchNormAct2d: activations (one with a parameter), apply_act=False, a
    drop layer, momentum=None and another eps, and a subclass."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        BatchNormAct2d(6, act_layer=nn.GELU, drop_layer=_HalfNegative),
        nn.Conv2d(6, 6, 3, padding=1),
        BatchNormAct2d(6, apply_act=False, momentum=None, eps=1e-3),
        _TaggedBatchNormAct2d(6, tag="kept", act_layer="prelu"),
        nn.Conv2d(6, 4, 3, stride=2),
        BatchNormAct2d(4, act_layer="silu"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _timm_model(name):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5)


def _randomize(model):
    """Non-default affine parameters and running statistics, so that keeping them is visible."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, _BatchNorm):
                channels = layer.num_features
                layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(channels, generator=generator) * 0.2)
                layer.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return model.double().train()


# name -> (original model, model the ranks convert): the same weights
def _case(name):
    if name == "variants":
        original = _randomize(_variants())
        return original, copy.deepcopy(original)
    if name == "timm-converted test_efficientnet":
        original = _randomize(_timm_model("test_efficientnet"))
        converted_by_timm = timm.layers.convert_sync_batchnorm(copy.deepcopy(original))
        assert {type(m) for m in converted_by_timm.modules()} & {timm.layers.SyncBatchNormAct}
        return original, converted_by_timm
    original = _randomize(_timm_model(name))
    return original, copy.deepcopy(original)


DEFAULT_FAMILIES = ["test_efficientnet", "test_byobnet", "test_resnet", "variants", "timm-converted test_efficientnet"]
SLOW_FAMILIES = ["mobilenetv3_small_050", "regnetx_002", "cs3darknet_focus_s", "lcnet_050"]


def _data(steps, channels=3, size=32):
    generator = torch.Generator().manual_seed(2)
    total = sum(SIZES)
    return [
        torch.randn(total, channels, size, size, dtype=torch.float64, generator=generator) * 2 + 0.5
        for _ in range(steps)
    ]


def _slice(x, rank):
    start = sum(SIZES[:rank])
    return x[start : start + SIZES[rank]]


def _train_steps(model, inputs, upstream, rank=None):
    """Training-mode forward/backward per step: outputs, input gradients, weight gradients, buffers."""
    record = {"outputs": [], "input_grads": [], "param_grads": [], "buffers": []}
    for x, grad in zip(inputs, upstream):
        if rank is not None:
            x, grad = _slice(x, rank), _slice(grad, rank)
        x = x.clone().requires_grad_()
        output = model(x)
        output.backward(grad)
        record["outputs"].append(output.detach())
        record["input_grads"].append(x.grad)
        record["param_grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        record["buffers"].append({n: b.clone() for n, b in model.named_buffers()})
        model.zero_grad()
    return record


def _module_types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def _by_value(obj) -> bytes:
    """Models and tensors as bytes: passed as objects, each tensor would cost the forkserver a file
    descriptor (it sends at most 256)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(payload: bytes):
    return torch.load(io.BytesIO(payload), weights_only=False)


def _rank_runs(rank, world_size, payload):
    cases, ddp_case = _from_bytes(payload)
    return _rank_converts(rank, cases), None if ddp_case is None else _rank_trains_ddp(rank, world_size, *ddp_case)


def _rank_converts(rank, cases):
    results = {}
    for name, (model, inputs, upstream) in cases.items():
        acts = {n: (m.act, m.drop) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and hasattr(m, "act")}
        model = syncnorm.convert_sync_batchnorm(model)
        # The synced layers hold the very act and drop modules of the layers they replace.
        kept = all(
            (getattr(model.get_submodule(n), "act", None), getattr(model.get_submodule(n), "drop", None)) == pair
            for n, pair in acts.items()
        )
        synced_types = {type(m) for m in model.modules() if isinstance(m, _BatchNorm)}
        record = _train_steps(model, inputs, upstream, rank)
        reverted = syncnorm.revert_sync_batchnorm(model)  # a copy, with its own act/drop copies
        syncnorm.revert_sync_batchnorm(model, inplace=True)
        kept_after_revert = all(
            (model.get_submodule(n).act, model.get_submodule(n).drop) == pair for n, pair in acts.items()
        )
        results[name] = dict(record, synced_types=synced_types, reverted=reverted,
                             act_kept=(kept, kept_after_revert))
    return results


def _assert_close(actual, expected, what):
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE * scale, f"{what}: max abs error {error:.3g} (scale {scale:.3g})"


def _check_family(name, original, result, inputs, upstream):
    reference = _train_steps(original, inputs, upstream)
    per_rank = result  # list by rank
    if name == "test_resnet":
        assert per_rank[0]["synced_types"] == {syncnorm.SyncBatchNorm}
    else:
        assert SyncBatchNormAct2d in per_rank[0]["synced_types"]
    for step in range(STEPS):
        for rank, record in enumerate(per_rank):
            where = f"{name}, step {step}, rank {rank}"
            _assert_close(record["outputs"][step], _slice(reference["outputs"][step], rank), f"output ({where})")
            _assert_close(record["input_grads"][step], _slice(reference["input_grads"][step], rank),
                          f"input gradient ({where})")
            for buffer_name, expected in reference["buffers"][step].items():
                _assert_close(record["buffers"][step][buffer_name].double(), expected.double(),
                              f"{buffer_name} ({where})")
        for param_name, expected in reference["param_grads"][step].items():
            summed = sum(record["param_grads"][step][param_name] for record in per_rank)
            _assert_close(summed, expected, f"gradient of {param_name} ({name}, step {step})")
    assert all(record["act_kept"] == (True, True) for record in per_rank)

    # Reverted: the original classes, module for module, and the same eval outputs.
    reverted = per_rank[1]["reverted"]
    assert _module_types(reverted) == _module_types(original)
    assert reverted.state_dict().keys() == original.state_dict().keys()
    reverted.eval(), original.eval()
    with torch.no_grad():
        x = inputs[0]
        _assert_close(reverted(x), original(x), f"eval output after revert ({name})")


def _sgd_steps(model, batches, rank=None, world_size=1):
    """SGD with momentum on cross-entropy. Under DDP (which averages gradients over ranks) each rank's
    loss is its share of the global mean, so uneven batches give the global batch's gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for x, target in batches:
        total = x.size(0)
        if rank is not None:
            x, target = _slice(x, rank), _slice(target, rank)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target, reduction="sum") * world_size / total
        loss.backward()
        optimizer.step()


def _rank_trains_ddp(rank, world_size, model, batches):
    """README's recipe: convert, then DDP; train; revert the unwrapped model."""
    ddp_model = nn.parallel.DistributedDataParallel(syncnorm.convert_sync_batchnorm(model))
    _sgd_steps(ddp_model, batches, rank, world_size)
    synced = sum(isinstance(m, SyncBatchNormAct2d) for m in ddp_model.modules())
    reverted = syncnorm.revert_sync_batchnorm(ddp_model.module)
    return synced, {k: v.clone() for k, v in ddp_model.module.state_dict().items()}, reverted


def _ddp_case():
    model = _randomize(_timm_model("test_efficientnet"))
    generator = torch.Generator().manual_seed(4)
    batches = [(x, torch.randint(0, 5, (x.size(0),), generator=generator)) for x in _data(2)]
    return model, batches


def _run_families(names, ddp=False):
    cases, originals = {}, {}
    for name in names:
        original, to_convert = _case(name)
        inputs = _data(STEPS)
        with torch.no_grad():
            out_shape = copy.deepcopy(original)(inputs[0]).shape  # a copy: training mode moves statistics
        generator = torch.Generator().manual_seed(3)
        upstream = [torch.randn(out_shape, dtype=torch.float64, generator=generator) for _ in range(STEPS)]
        cases[name] = (to_convert, inputs, upstream)
        originals[name] = original
    ddp_case = _ddp_case() if ddp else None
    results = run_ranks(_rank_runs, len(SIZES), _by_value((cases, ddp_case)), timeout=300, pg_timeout=120)
    families = {
        name: ([r[0][name] for r in results], originals[name], cases[name][1], cases[name][2]) for name in names
    }
    return families, (ddp_case, [r[1] for r in results])


@pytest.fixture(scope="module")
def default_families():
    """One run of 2 ranks for every default family and the DDP training: starting ranks costs more
    than the models' steps."""
    return _run_families(DEFAULT_FAMILIES, ddp=True)


@pytest.mark.parametrize("name", DEFAULT_FAMILIES)
def test_converted_timm_model_equals_original_on_the_global_batch(default_families, name):
    per_rank, original, inputs, upstream = default_families[0][name]
    _check_family(name, original, per_rank, inputs, upstream)


@pytest.mark.slow
def test_more_timm_families_equal_original_on_the_global_batch():
    for name, (per_rank, original, inputs, upstream) in _run_families(SLOW_FAMILIES)[0].items():
        _check_family(name, original, per_rank, inputs, upstream)


def test_ddp_training_of_a_converted_timm_model_equals_one_process(default_families):
    (original, batches), per_rank = default_families[1]
    untrained = copy.deepcopy(original)
    _sgd_steps(original, batches)  # one process, the global batch, timm's own layers
    expected = original.state_dict()
    layers = sum(isinstance(m, BatchNormAct2d) for m in original.modules())
    for rank, (synced, state, reverted) in enumerate(per_rank):
        assert synced == layers == 13
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            _assert_close(state[name].double(), value.double(), f"{name} after DDP training (rank {rank})")
        assert _module_types(reverted) == _module_types(original)
    # Training moved the weights, so the comparison above compared something.
    assert (expected["conv_stem.weight"] - untrained.state_dict()["conv_stem.weight"]).abs().max() > 1e-3
    reverted.eval(), original.eval()
    with torch.no_grad():
        _assert_close(reverted(batches[0][0]), original(batches[0][0]), "eval output of the reverted DDP model")


def test_one_call_needs_no_extra_import_and_syncnorm_does_not_import_timm():
    import subprocess
    import sys

    script = (
        "import sys, syncnorm\n"
        "assert 'timm' not in sys.modules, 'import syncnorm imported timm'\n"
        "import timm\n"
        "layer = syncnorm.convert_sync_batchnorm(timm.layers.BatchNormAct2d(3, act_layer='silu'))\n"
        "print(type(layer).__name__, type(layer.act).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SyncBatchNormAct2d", "SiLU"]


def test_frozen_layers_stay_and_split_batchnorm_is_refused():
    model = _randomize(_timm_model("test_efficientnet"))
    model.blocks[0] = timm.layers.freeze_batch_norm_2d(model.blocks[0])
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNormAct2d)]
    assert len(frozen) == 1
    reference = copy.deepcopy(model)
    x = _data(1)[0]
    converted = syncnorm.convert_sync_batchnorm(model)
    assert [m for m in converted.modules() if isinstance(m, FrozenBatchNormAct2d)] == frozen  # the same objects
    assert not any(type(m) is BatchNormAct2d for m in converted.modules())
    assert torch.equal(converted(x), reference(x))  # one process, training mode
    assert _module_types(syncnorm.revert_sync_batchnorm(converted)) == _module_types(reference)

    from timm.layers.split_batchnorm import SplitBatchNorm2d

    with pytest.raises(ValueError, match=r"SplitBatchNorm2d, which has its own forward instead of BatchNorm's, at '1'"):
        syncnorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), SplitBatchNorm2d(4, num_splits=2)))
