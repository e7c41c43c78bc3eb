"""convert_sync_batchnorm / revert_sync_batchnorm on real models, and the single-process fallback."""

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncnorm
from syncnorm.convert import BatchNormNd


def _randomize_bn(model):
    """Non-default running statistics and affine parameters, so that keeping them is visible."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.num_batches_tracked.fill_(7)
    return model


def _classes(model):
    return [type(m) for m in model.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small])
def test_convert_and_revert_torchvision_models(factory):
    torch.manual_seed(0)
    model = _randomize_bn(factory(num_classes=10)).eval()
    original_classes = _classes(model)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    first_bn = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    first_bn.weight.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)

    converted = syncnorm.convert_sync_batchnorm(model)
    assert _classes(converted) == [syncnorm.SyncBatchNorm] * len(original_classes)
    assert len(original_classes) > 10
    state = converted.state_dict()
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[k], v) for k, v in original_state.items())
    assert not any(m.training for m in converted.modules())
    first_sync = next(m for m in converted.modules() if isinstance(m, syncnorm.SyncBatchNorm))
    assert first_sync.weight is first_bn.weight and not first_sync.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(converted(x), expected)

    reverted = syncnorm.revert_sync_batchnorm(converted)
    assert _classes(reverted) == original_classes
    assert not any(isinstance(m, syncnorm.SyncBatchNorm) for m in reverted.modules())
    assert all(torch.equal(reverted.state_dict()[k], v) for k, v in original_state.items())
    with torch.no_grad():
        assert torch.equal(reverted(x), expected)


def test_convert_keeps_everything_of_each_layer():
    model = nn.Sequential(
        nn.BatchNorm1d(3, eps=1e-3, momentum=None),
        nn.BatchNorm3d(2, affine=False),
        nn.BatchNorm2d(4, track_running_stats=False),
    ).double()
    model[0].train()
    model[1].eval()
    converted = syncnorm.convert_sync_batchnorm(model, process_group="sentinel-group")
    layers = list(converted)
    assert all(type(layer) is syncnorm.SyncBatchNorm for layer in layers)
    assert [l.eps for l in layers] == [1e-3, 1e-5, 1e-5]
    assert [l.momentum for l in layers] == [None, 0.1, 0.1]
    assert [l.affine for l in layers] == [True, False, True]
    assert [l.track_running_stats for l in layers] == [True, True, False]
    assert [l.training for l in layers] == [True, False, True]
    assert all(l.process_group == "sentinel-group" for l in layers)
    assert layers[0].weight.dtype == torch.float64 and layers[1].running_mean.dtype == torch.float64
    assert not any(t.is_meta for t in converted.state_dict().values())


def test_convert_root_shared_layers_and_torch_syncbatchnorm():
    root = syncnorm.convert_sync_batchnorm(nn.BatchNorm2d(5))
    assert type(root) is syncnorm.SyncBatchNorm

    shared = nn.BatchNorm1d(4)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(nn.Linear(4, 4), shared)})
    converted = syncnorm.convert_sync_batchnorm(model)
    assert converted["a"][0] is converted["b"][1]  # still one layer, converted once

    # Named by its smallest path, whatever order the parents registered it in (issue 27).
    for order in (["a", "b"], ["b", "a"]):
        model = nn.ModuleDict({name: nn.Sequential(shared) for name in order})
        assert syncnorm.convert_sync_batchnorm(model)["a"][0]._identity.name == "'a.0'"

    from_torch = syncnorm.convert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)))
    assert type(from_torch[0]) is syncnorm.SyncBatchNorm
    # torch's SyncBN has no "plain" class to go back to: it reverts to a BatchNorm taking 2D-5D input.
    plain = syncnorm.revert_sync_batchnorm(from_torch)[0]
    assert type(plain) is BatchNormNd
    for shape in [(4, 3), (4, 3, 5), (4, 3, 5, 5), (4, 3, 2, 5, 5)]:
        assert plain(torch.randn(shape)).shape == shape
    # A SyncBatchNorm built directly also reverts to BatchNormNd.
    assert type(syncnorm.revert_sync_batchnorm(syncnorm.SyncBatchNorm(3))) is BatchNormNd


def test_checkpoints_move_between_batchnorm_torch_syncbn_and_syncnorm():
    source = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    ours = syncnorm.convert_sync_batchnorm(copy.deepcopy(source))
    ours_state = ours.state_dict()
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(source))
    assert ours_state.keys() == torch_sync.state_dict().keys() == source.state_dict().keys()
    fresh = syncnorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    fresh.load_state_dict(torch_sync.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in source.state_dict().items())
    # Pickling and deep copies work like any module.
    assert type(pickle.loads(pickle.dumps(ours))[1]) is syncnorm.SyncBatchNorm
    assert copy.deepcopy(ours)[1].weight is not ours[1].weight


@pytest.mark.parametrize("dim", [2, 3, 4, 5])
def test_without_process_group_equals_batchnorm(dim):
    shape = (6, 3, 4, 5, 2)[:dim]
    reference = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim](3)
    layer = syncnorm.SyncBatchNorm(3)
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        x_ref = x.clone().requires_grad_()
        x_ours = x.clone().requires_grad_()
        reference(x_ref).pow(2).sum().backward()
        layer(x_ours).pow(2).sum().backward()
        assert torch.equal(x_ours.grad, x_ref.grad)
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(layer.named_buffers())[name], buffer)
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    layer.eval(), reference.eval()
    x = torch.randn(shape)
    assert torch.equal(layer(x), reference(x))


def _trained_syncnorm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5))
    model = syncnorm.convert_sync_batchnorm(_randomize_bn(model))
    model[1].weight.requires_grad_(False)
    model(torch.randn(8, 3, 6, 6)).sum().backward()  # grads and one running-statistics update
    return model


def test_revert_default_returns_an_independent_copy():
    model = _trained_syncnorm_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reverted = syncnorm.revert_sync_batchnorm(model)

    # The argument is untouched: still syncnorm layers, same state, still training.
    assert _classes(model) == [syncnorm.SyncBatchNorm] * 2 and model.training
    assert _classes(reverted) == [nn.BatchNorm2d, nn.BatchNorm1d] and reverted.training
    # Nothing is shared: no parameter or buffer storage in common; gradients stay behind (as with
    # copy.deepcopy of any model).
    ours = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters() if p.grad is not None]
    theirs = list(reverted.parameters()) + list(reverted.buffers())
    assert len(theirs) == 14 and not {t.data_ptr() for t in ours} & {t.data_ptr() for t in theirs}
    assert all(p.grad is None for p in reverted.parameters()) and model[4].weight.grad is not None
    assert all(torch.equal(reverted.state_dict()[k], v) for k, v in before.items())
    assert not reverted[1].weight.requires_grad and reverted[4].weight.requires_grad

    # Training the copy (as plain BN) leaves the original's statistics where they were.
    reverted(torch.randn(8, 3, 6, 6) + 3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(reverted[1].running_mean, before["1.running_mean"])


def test_revert_inplace_shares_parameters_and_keeps_the_optimizer_working():
    model = _trained_syncnorm_model()
    weight, running_mean = model[4].weight, model[4].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    reverted = syncnorm.revert_sync_batchnorm(model, inplace=True)
    assert reverted is model  # the root is not a BatchNorm: children were replaced in place
    assert _classes(model) == [nn.BatchNorm2d, nn.BatchNorm1d]
    assert model[4].weight is weight and model[4].running_mean is running_mean
    expected = weight.detach() - 0.5 * weight.grad
    optimizer.step()  # the optimizer still holds the reverted layer's weight
    assert torch.equal(model[4].weight.detach(), expected)

    # A SyncBatchNorm root is replaced (use the return value) and shares its tensors too.
    root = syncnorm.SyncBatchNorm(3)
    plain = syncnorm.revert_sync_batchnorm(root, inplace=True)
    assert type(plain) is BatchNormNd and plain.weight is root.weight and plain.running_var is root.running_var


def test_revert_copy_shares_process_groups_and_explains_what_it_cannot_copy():
    import threading

    group = threading.Lock()  # stands in for a ProcessGroup: neither can be pickled or deep-copied
    model = nn.Sequential(syncnorm.SyncBatchNorm(3, process_group=group))
    reverted = syncnorm.revert_sync_batchnorm(model)
    assert type(reverted[0]) is BatchNormNd and model[0].process_group is group

    model.lock = threading.Lock()  # something else in the model that cannot be copied
    with pytest.raises(TypeError, match=r"cannot be deep-copied .*pass inplace=True"):
        syncnorm.revert_sync_batchnorm(model)
    assert type(syncnorm.revert_sync_batchnorm(model, inplace=True)[0]) is BatchNormNd


def test_isinstance_relations_differ_from_torch_syncbatchnorm():
    layer = syncnorm.convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(layer, _BatchNorm)  # code that looks for "any BatchNorm" finds it
    assert not isinstance(layer, nn.SyncBatchNorm)  # code that special-cases torch's SyncBN does not
    # torch's converter takes any _BatchNorm, syncnorm's included: running it afterwards (as
    # Trainer(sync_batchnorm=True) does) swaps syncnorm's layers for torch's CPU-refusing class.
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))[0]) is nn.SyncBatchNorm


def test_classmethod_alias_works_like_torchs_idiom():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    weight, running_var = model[1].weight, model[1].running_var
    # torch's line, nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group), with the class swapped
    converted = syncnorm.SyncBatchNorm.convert_sync_batchnorm(model, process_group="sentinel-group")
    assert converted is model and type(model[1]) is syncnorm.SyncBatchNorm
    assert model[1].weight is weight and model[1].running_var is running_var
    assert model[1].process_group == "sentinel-group"
    assert type(syncnorm.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))) is syncnorm.SyncBatchNorm
    assert _classes(syncnorm.revert_sync_batchnorm(model)) == [nn.BatchNorm2d]


# --- which layers convert, which raise, and the registry --------------------------------------------


class _DoubledBatchNorm(nn.BatchNorm2d):
    """A subclass with its own forward: syncing it as plain BatchNorm would drop the doubling."""

    def forward(self, input):
        return 2 * super().forward(input)


class _TaggedBatchNorm(nn.BatchNorm1d):
    """Keeps BatchNorm's forward; its own constructor signature and setting."""

    def __init__(self, tag, num_features):
        super().__init__(num_features, eps=1e-3)
        self.tag = tag


class _BatchNormXd(_BatchNorm):
    """mmcv's shape of layer: straight from _BatchNorm, any input rank, BatchNorm's forward."""

    def _check_input_dim(self, input):
        pass


class _NaiveSyncBatchNorm(nn.BatchNorm2d):
    """detectron2's NaiveSyncBatchNorm shape: its own forward (its own all-reduce there; a local
    stand-in here) and a setting of its own."""

    def __init__(self, *args, stats_mode="", **kwargs):
        super().__init__(*args, **kwargs)
        self._stats_mode = stats_mode

    def forward(self, input):
        return super().forward(input)


class _DoubledSyncBatchNorm(syncnorm.SyncBatchNorm):
    """The synced form of _DoubledBatchNorm."""

    def forward(self, input):
        return 2 * super().forward(input)


@pytest.fixture
def registry(monkeypatch):
    """Registrations made by a test end with it."""
    monkeypatch.setattr(syncnorm.convert, "_CONVERSIONS", dict(syncnorm.convert._CONVERSIONS))


def test_subclass_with_its_own_forward_raises_naming_it_and_changes_nothing():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), _DoubledBatchNorm(4)), _DoubledBatchNorm(4),
    )
    before = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match=(
        r"expected BatchNorm layers it can sync exactly \(got test_convert\._DoubledBatchNorm, which has its own "
        r"forward instead of BatchNorm's, at '1\.1'; 1 more: '2'\): register how it syncs with "
        r"syncnorm\.register_conversion \(docs/integrations\.md.*; nothing was changed"
    )):
        syncnorm.convert_sync_batchnorm(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == before  # not half converted
    with pytest.raises(ValueError, match=r"at the root"):
        syncnorm.convert_sync_batchnorm(_DoubledBatchNorm(3))


def test_subclasses_that_keep_batchnorms_forward_convert_and_come_back_as_themselves():
    model = _randomize_bn(nn.Sequential(nn.Linear(3, 4), _TaggedBatchNorm("kept", 4), _BatchNormXd(4))).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)
    converted = syncnorm.convert_sync_batchnorm(model)
    assert [type(m) for m in converted[1:]] == [syncnorm.SyncBatchNorm] * 2
    assert converted[1].tag == "kept" and converted[1].eps == 1e-3  # the subclass's settings travel along
    # One process: the converted layers compute what the originals computed (training and eval).
    assert torch.equal(converted(x), reference(x))
    reverted = syncnorm.revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted[1:]] == [_TaggedBatchNorm, _BatchNormXd]
    assert reverted[1].tag == "kept" and not hasattr(reverted[1], "process_group")
    assert all(torch.equal(reverted.state_dict()[k], v) for k, v in reference.state_dict().items())
    reverted.eval(), reference.eval()
    assert torch.equal(reverted(x), reference(x))


def test_torch_syncbatchnorm_subclasses():
    class KeepsForward(nn.SyncBatchNorm):
        pass

    class OwnForward(nn.SyncBatchNorm):
        def forward(self, input):
            return super().forward(input) + 1

    converted = syncnorm.convert_sync_batchnorm(nn.Sequential(KeepsForward(3)))
    assert type(converted[0]) is syncnorm.SyncBatchNorm
    assert type(syncnorm.revert_sync_batchnorm(converted)[0]) is BatchNormNd  # a local BatchNorm
    own_forward = r"OwnForward, which has its own forward instead of SyncBatchNorm's, at '0'"
    for walker in (syncnorm.convert_sync_batchnorm, syncnorm.revert_sync_batchnorm):
        with pytest.raises(ValueError, match=own_forward):
            walker(nn.Sequential(OwnForward(3)))


def test_lazy_batchnorm_must_see_one_batch_before_converting():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"got an uninitialized LazyBatchNorm2d at '1'\): run one forward pass"):
        syncnorm.convert_sync_batchnorm(model)
    # Nothing to materialize (no affine, no running statistics), still unknown num_features: refused too.
    with pytest.raises(ValueError, match=r"uninitialized LazyBatchNorm1d at the root"):
        syncnorm.convert_sync_batchnorm(nn.LazyBatchNorm1d(affine=False, track_running_stats=False))
    x = torch.randn(4, 3, 6, 6)
    model(x)  # materialized: torch turns the layer into a plain BatchNorm2d
    reference = copy.deepcopy(model)
    converted = syncnorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is syncnorm.SyncBatchNorm and converted[1].num_features == 4
    assert torch.equal(converted(x), reference(x))
    assert type(syncnorm.revert_sync_batchnorm(converted)[1]) is nn.BatchNorm2d


def test_frozen_parametrized_and_already_synced_layers():
    from torch.nn.utils import parametrize
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    synced = syncnorm.SyncBatchNorm(4)
    model = nn.Sequential(frozen, synced, nn.BatchNorm2d(4))
    converted = syncnorm.convert_sync_batchnorm(model)
    assert converted[0] is frozen and converted[1] is synced and type(converted[2]) is syncnorm.SyncBatchNorm
    assert syncnorm.convert_sync_batchnorm(converted)[2] is converted[2]  # converting twice changes nothing

    class Positive(nn.Module):
        def forward(self, weight):
            return weight.abs()

    parametrized = nn.Sequential(nn.BatchNorm2d(4))
    parametrize.register_parametrization(parametrized[0], "weight", Positive())
    with pytest.raises(ValueError, match=r"BatchNorm2d with parametrizations at '0'\): convert before parametrizing"):
        syncnorm.convert_sync_batchnorm(parametrized)


def test_registered_class_converts_and_reverts(registry):
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), _NaiveSyncBatchNorm(4, stats_mode="N")))
    with pytest.raises(ValueError, match=r"_NaiveSyncBatchNorm, which has its own forward"):
        syncnorm.convert_sync_batchnorm(model)

    syncnorm.register_conversion(_NaiveSyncBatchNorm)
    weight = model[1].weight
    converted = syncnorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is syncnorm.SyncBatchNorm and converted[1].weight is weight
    reverted = syncnorm.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is _NaiveSyncBatchNorm and reverted[1]._stats_mode == "N"

    # revert_to: converted layers, and layers of the class that never were converted, become plain.
    syncnorm.register_conversion(_NaiveSyncBatchNorm, revert_to=nn.BatchNorm2d)
    assert type(syncnorm.revert_sync_batchnorm(syncnorm.convert_sync_batchnorm(reverted))[1]) is nn.BatchNorm2d
    unconverted = nn.Sequential(_NaiveSyncBatchNorm(4))
    assert type(syncnorm.revert_sync_batchnorm(unconverted)[0]) is nn.BatchNorm2d


def test_registered_synced_class_computes_what_the_original_did(registry):
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), _DoubledBatchNorm(4))).double()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    syncnorm.register_conversion(_DoubledBatchNorm, _DoubledSyncBatchNorm)
    converted = syncnorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is _DoubledSyncBatchNorm
    assert torch.equal(converted(x), reference(x))  # training mode, one process: local statistics
    reverted = syncnorm.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is _DoubledBatchNorm
    assert torch.equal(reverted(x), reference(x))
    # One built directly (not converted) reverts to the class it is registered for.
    assert type(syncnorm.revert_sync_batchnorm(_DoubledSyncBatchNorm(3))) is _DoubledBatchNorm


def test_unknown_synced_subclass_cannot_revert_and_bad_registrations(registry):
    class Unknown(syncnorm.SyncBatchNorm):
        def forward(self, input):
            return super().forward(input) * 3

    with pytest.raises(ValueError, match=r"Unknown, a SyncBatchNorm subclass with its own forward .* at '0'"):
        syncnorm.revert_sync_batchnorm(nn.Sequential(Unknown(3)), inplace=True)
    with pytest.raises(TypeError, match=r"expected source to be a torch.nn.modules.batchnorm._BatchNorm "
                                        r"subclass \(got GroupNorm\)"):
        syncnorm.register_conversion(nn.GroupNorm)
    with pytest.raises(TypeError, match=r"expected synced to be a syncnorm.SyncBatchNorm subclass "
                                        r"\(got SyncBatchNorm\)"):
        syncnorm.register_conversion(_DoubledBatchNorm, nn.SyncBatchNorm)
    with pytest.raises(TypeError, match=r"already synced"):
        syncnorm.register_conversion(_DoubledSyncBatchNorm)
    with pytest.raises(TypeError, match=r"expected a plain revert_to class"):
        syncnorm.register_conversion(_DoubledBatchNorm, _DoubledSyncBatchNorm, revert_to=_DoubledSyncBatchNorm)


def test_the_registration_example_in_the_docs_runs_as_printed(registry):
    import os
    import re

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "integrations.md")
    with open(docs, encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
    (example,) = [block for block in blocks if "class SyncScaledBatchNorm2d" in block]
    namespace = {"__name__": "docs_example"}
    exec(compile(example, docs, "exec"), namespace)
    assert type(namespace["model"][1]) is namespace["SyncScaledBatchNorm2d"] and namespace["model"][1].scale == 0.5
    assert type(namespace["plain"][1]) is namespace["ScaledBatchNorm2d"] and namespace["plain"][1].scale == 0.5
    x = torch.randn(4, 3, 6, 6)
    expected = 0.5 * nn.functional.batch_norm(namespace["model"][0](x), None, None, training=True)
    assert torch.allclose(namespace["model"](x), expected, atol=1e-6)


def test_hooks_on_a_layer_survive_convert_and_revert():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seen = []
    handle = model[1].register_forward_hook(lambda layer, args, output: seen.append(type(layer).__name__))
    model[1].register_forward_pre_hook(lambda layer, args: seen.append("pre"))
    x = torch.randn(2, 3, 5, 5)
    syncnorm.convert_sync_batchnorm(model)(x)
    assert seen == ["pre", "SyncBatchNorm"]
    syncnorm.revert_sync_batchnorm(model, inplace=True)(x)
    assert seen[2:] == ["pre", "BatchNorm2d"]
    handle.remove()  # the handle still reaches the layer's hooks
    syncnorm.revert_sync_batchnorm(syncnorm.convert_sync_batchnorm(model))(x)
    assert seen[4:] == ["pre"]
