"""SyncBatchNormAct (syncnorm/act.py) against plain torch: BatchNorm + the activation, with the same weight
rule, on the concatenated global batch in one process."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncnorm
from syncnorm._compat import COMPILE_MIN_TORCH, TORCH_VERSION
from syncnorm._identity import FUNCTIONAL
from syncnorm.act import SyncBatchNormActFunction, effective_weight
from syncnorm.testing import run_ranks

ACTS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("leaky_relu", 0.2), ("elu", 0.5)]
TOL = 1e-10


def _act(name, param):
    return {"leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param), "identity": nn.Identity()}[name]


class RuledBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's BatchNorm with the weight rule: |weight| < eps is used as eps with its sign, the gradient
    passed straight through."""

    def _check_input_dim(self, input):
        pass

    def forward(self, input):
        if self.training:
            self.num_batches_tracked.add_(1)
        weight = self.weight + (effective_weight(self.weight, self.eps) - self.weight).detach()
        return F.batch_norm(input, self.running_mean, self.running_var, weight, self.bias, self.training,
                            self.momentum, self.eps)


def _reference(act, param, channels, weight, bias, dtype=torch.float64):
    bn = RuledBatchNorm(channels).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return nn.Sequential(bn, _act(act, param))


def _case(seed, sizes, channels=4, shape=(3, 5)):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, channels, *shape, generator=generator, dtype=torch.float64) * 2 + 0.5
    grad = torch.randn(n, channels, *shape, generator=generator, dtype=torch.float64)
    weight = torch.linspace(-1.5, 1.5, channels, dtype=torch.float64) + 0.1
    bias = torch.linspace(-0.3, 0.3, channels, dtype=torch.float64)
    return x, grad, weight, bias


def _close(actual, expected, tol=TOL, what=""):
    worst = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert worst <= tol, f"{what}: max difference {worst} > {tol}"


# -- one process: the Function's math ------------------------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("act,param", ACTS)
def test_function_matches_batchnorm_and_activation(act, param, inplace):
    x, grad, weight, bias = _case(0, [7])
    ref = _reference(act, param, 4, weight, bias)
    x_ref = x.clone().requires_grad_()
    expected = ref(x_ref)
    expected.backward(grad)
    x_in = x.clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    running_mean, running_var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    start = x_in * 1 if inplace else x_in  # a non-leaf for inplace
    out = SyncBatchNormActFunction.apply(start, w, b, running_mean, running_var, 1e-5, 0.1, None, FUNCTIONAL,
                                         act, param, inplace)
    if inplace:
        assert out.data_ptr() == start.data_ptr()
    out.backward(grad)
    _close(out, expected, what="output")
    _close(x_in.grad, x_ref.grad, what="input grad")
    _close(w.grad, ref[0].weight.grad, what="weight grad")
    _close(b.grad, ref[0].bias.grad, what="bias grad")
    _close(running_mean, ref[0].running_mean, what="running mean")
    _close(running_var, ref[0].running_var, what="running var")


@pytest.mark.parametrize("act,param", ACTS[:3])
def test_weights_at_and_near_zero_follow_the_rule(act, param):
    """Weights 0, -0.0, +-1e-7 (below eps) are used as +-eps; the gradient still reaches them. Recovering
    x_hat divides by eps here, so the weight gradient loses ~1/eps of relative precision: 1e-8 (float64)."""
    x, grad, _, bias = _case(1, [9])
    weight = torch.tensor([0.0, -0.0, 1e-7, -1e-7], dtype=torch.float64)
    ref = _reference(act, param, 4, weight, bias)
    x_ref = x.clone().requires_grad_()
    ref(x_ref).backward(grad)
    x_in, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = SyncBatchNormActFunction.apply(x_in, w, bias, None, None, 1e-5, 0.1, None, FUNCTIONAL, act, param, False)
    out.backward(grad)
    _close(out, ref(x), what="output")
    assert torch.equal(torch.sign(effective_weight(weight, 1e-5)), torch.tensor([1.0, -1.0, 1.0, -1.0]).double())
    _close(x_in.grad, x_ref.grad, what="input grad")
    _close(w.grad, ref[0].weight.grad, tol=1e-8 * ref[0].weight.grad.abs().max().item(), what="weight grad")
    assert (w.grad != 0).all()  # a zero weight still learns


def test_only_the_output_and_per_channel_tensors_are_saved():
    """saved_tensors_hooks sees what autograd keeps: BatchNorm + LeakyReLU keeps the input and the output
    (two activation-sized tensors); the fused layer keeps only its output."""
    x = torch.randn(4, 3, 8, 8, requires_grad=True)

    def saved(fn):
        seen = []

        def pack(tensor):
            seen.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = fn(x * 1)
        return out, {(t.untyped_storage().data_ptr(), t.numel()) for t in seen if t.dim() > 1}  # activation-sized: not per-channel

    plain = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.01))
    _, plain_saved = saved(plain)
    assert len(plain_saved) == 2
    out, fused_saved = saved(lambda t: SyncBatchNormActFunction.apply(
        t, torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True), None, None, 1e-5, 0.1, None,
        FUNCTIONAL, "leaky_relu", 0.01, False))
    assert fused_saved == {(out.untyped_storage().data_ptr(), out.numel())}


# -- several ranks: the concatenated global batch in one process is the reference ---------------------------

CASES = [("leaky_relu", 0.01, False), ("elu", 1.0, False), ("identity", 0.0, False), ("leaky_relu", 0.1, True)]


def _train_rank(rank, world, sizes, dtype=torch.float64, channels_last=False, device="cpu"):
    """Each case: a layer on this rank's slice, one training step, then eval on the whole batch (on
    ``device``; tests/test_gpu.py runs it on cuda:0); results come back on the CPU."""
    results = []
    for seed, (act, param, inplace) in enumerate(CASES):
        x, grad, weight, bias = _case(seed, sizes)
        start = sum(sizes[:rank])
        x, grad = x.to(device), grad.to(device)
        piece = x[start : start + sizes[rank]].to(dtype).requires_grad_()
        if channels_last:
            piece = piece.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        layer = syncnorm.SyncBatchNormAct(4, activation=act, negative_slope=param, alpha=param or 1.0,
                                          inplace=inplace, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                          device=device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        out = layer(piece * 1 if inplace else piece)
        assert out.dtype == dtype
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
        out.backward(grad[start : start + sizes[rank]].to(dtype))
        layer.eval()
        record = dict(out=out.detach(), grad=piece.grad, weight=layer.weight.grad, bias=layer.bias.grad,
                      mean=layer.running_mean, var=layer.running_var, steps=layer.num_batches_tracked,
                      eval=layer(x[:3].to(dtype)).detach())
        results.append({key: value.cpu() for key, value in record.items()})
    return results


def _expected(sizes):
    cases = []
    for seed, (act, param, _) in enumerate(CASES):
        x, grad, weight, bias = _case(seed, sizes)
        ref = _reference(act, param, 4, weight, bias)
        x = x.clone().requires_grad_()
        out = ref(x)
        out.backward(grad)
        ref.eval()
        cases.append(dict(out=out.detach(), grad=x.grad, weight=ref[0].weight.grad, bias=ref[0].bias.grad,
                          mean=ref[0].running_mean, var=ref[0].running_var, steps=ref[0].num_batches_tracked,
                          eval=ref(x[:3]).detach()))
    return cases


def _check_ranks(results, sizes, tol=TOL):
    for expected, per_rank in zip(_expected(sizes), zip(*results)):
        _close(torch.cat([r["out"] for r in per_rank]), expected["out"], tol, "outputs")
        _close(torch.cat([r["grad"] for r in per_rank]), expected["grad"], tol, "input grads")
        # DDP sums the ranks' parameter gradients (then divides by the world size)
        _close(sum(r["weight"] for r in per_rank), expected["weight"], tol * 10, "weight grad")
        _close(sum(r["bias"] for r in per_rank), expected["bias"], tol * 10, "bias grad")
        for r in per_rank:
            for key in ("mean", "var", "eval"):
                _close(r[key], expected[key], tol, key)
            assert r["steps"] == expected["steps"]


def test_two_ranks_uneven_batches_match_the_global_batch():
    sizes = [3, 5]
    _check_ranks(run_ranks(_train_rank, 2, sizes), sizes)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[4, 0, 3], [1, 1, 2], [0, 6, 0]])
def test_three_ranks_with_empty_and_tiny_batches(sizes):
    _check_ranks(run_ranks(_train_rank, 3, sizes), sizes)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), pytest.param(torch.float16, 0.02, marks=pytest.mark.slow)])
def test_half_precision_channels_last(dtype, tol):
    """Half-precision inputs (statistics and the recovered x_hat in float32) stay in their dtype and layout."""
    sizes = [3, 5]
    results = run_ranks(_train_rank, 2, sizes, dtype, True)
    for expected, per_rank in zip(_expected(sizes), zip(*results)):
        scale = expected["out"].abs().max().item()
        _close(torch.cat([r["out"] for r in per_rank]), expected["out"], tol * scale, "outputs")
        _close(torch.cat([r["grad"] for r in per_rank]), expected["grad"], tol * expected["grad"].abs().max().item(),
               "input grads")
        for r in per_rank:
            _close(r["mean"], expected["mean"], 1e-2, "running mean")


# -- the rest of the library: compile, checkpointing, DDP, join, update_bn_stats, identity check --------------

def _net(norm_act):
    """conv -> norm+LeakyReLU -> conv -> norm+ELU -> pool -> linear; ``norm_act(C, act, param)``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm_act(4, "leaky_relu", 0.1), nn.Conv2d(4, 4, 3, padding=1),
        norm_act(4, "elu", 1.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double()


def _fused(channels, act, param):
    return syncnorm.SyncBatchNormAct(channels, activation=act, negative_slope=param, alpha=param)


def _plain(channels, act, param):
    return nn.Sequential(RuledBatchNorm(channels), _act(act, param))


def _batch(rank, step, size):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(size, 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1


def _state(net):
    return [t.detach().clone() for t in list(net.parameters()) + list(net.buffers())]


def _ddp_rank(rank, world, sizes, mode, backend="aot_eager"):
    """Two SGD steps of _net(_fused) under DDP; mode: "eager", "checkpoint", "compile" (with ``backend``)
    or "join"."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.checkpoint import checkpoint

    net = _net(_fused)
    model = DistributedDataParallel(net)
    forward = model
    if mode == "compile":  # the model itself (DDP's forward is not traceable whole), without graph breaks
        torch._dynamo.reset()
        forward = torch.compile(net, fullgraph=True, backend=backend)
    elif mode == "checkpoint":
        inner = nn.Sequential(*net[:4])
        forward = lambda x: net[4:](checkpoint(inner, x, use_reentrant=False))  # noqa: E731
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    outputs = []
    steps = sizes[rank]
    context = syncnorm.join(model) if mode == "join" else _nothing()
    with context:
        for step, size in enumerate(steps):
            out = forward(_batch(rank, step, size))
            (out ** 2).sum().backward()
            if mode in ("checkpoint", "compile"):  # DDP not called: average the gradients as DDP would
                for p in net.parameters():
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
    return outputs, _state(net)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _ddp_reference(world, sizes):
    net = _net(_plain)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    outputs = [[] for _ in range(world)]
    for step in range(max(len(s) for s in sizes)):
        active = [r for r in range(world) if step < len(sizes[r])]
        pieces = [_batch(r, step, sizes[r][step]) for r in active]
        out = net(torch.cat(pieces))
        (out ** 2).sum().backward()
        for p in net.parameters():
            p.grad /= world  # DDP: the sum over ranks (zero from a rank that ran out) over the world size
        optimizer.step()
        optimizer.zero_grad()
        for r, piece in zip(active, out.split([p.size(0) for p in pieces])):
            outputs[r].append(piece.detach())
    return outputs, _state(net)


def _check_training(results, reference, tol=1e-9):
    ref_outputs, ref_state = reference
    for rank, (outputs, state) in enumerate(results):
        assert len(outputs) == len(ref_outputs[rank])
        for out, ref in zip(outputs, ref_outputs[rank]):
            _close(out, ref, tol, f"rank {rank} output")
        for mine, ref in zip(state, ref_state):
            _close(mine, ref, tol, f"rank {rank} parameter/buffer")


OLD_TORCH = pytest.mark.skipif(TORCH_VERSION < COMPILE_MIN_TORCH, reason=f"syncnorm compiles from torch {COMPILE_MIN_TORCH} on")


@pytest.mark.parametrize("mode,backend", [
    pytest.param("eager", None, marks=pytest.mark.slow), ("checkpoint", None), ("join", None),
    pytest.param("compile", "aot_eager", marks=OLD_TORCH),
    pytest.param("compile", "inductor", marks=[OLD_TORCH, pytest.mark.slow]),
])
def test_training_matches_one_process(mode, backend):
    """DDP (eager: also under join, the default case), torch.compile(fullgraph=True: no graph break),
    activation checkpointing (the recompute syncs again and counts the step once), syncnorm.join with ranks
    that have different numbers of batches: outputs, parameters, running statistics and num_batches_tracked
    as one process on the global batches."""
    # compile: the same shapes every step (a new batch size would compile again)
    sizes = {"join": [[3, 4, 0], [5, 2, 3, 2]], "compile": [[3, 3], [5, 5]]}.get(mode, [[3, 4], [5, 2]])
    results = run_ranks(_ddp_rank, 2, sizes, mode, backend, timeout=400)
    _check_training(results, _ddp_reference(2, sizes))


def _precise_rank(rank, world, sizes):
    net = _net(_fused)
    batches = [_batch(rank, step, size) for step, size in enumerate(sizes[rank])]
    syncnorm.update_bn_stats(net, batches, num_batches=len(batches))
    return [(net[i].running_mean, net[i].running_var) for i in (1, 3)]


def test_update_bn_stats_gives_the_pooled_statistics():
    """update_bn_stats sets the running statistics to the mean and unbiased variance of each fused layer's
    input over every rank's batches together (the reference collects those inputs in one process)."""
    sizes = [[3, 4], [5, 2]]
    results = run_ranks(_precise_rank, 2, sizes)
    net = _net(_plain)
    seen = {1: [], 3: []}
    hooks = [net[i].register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach())) for i in seen]
    with torch.no_grad():
        net.train()
        for step in range(2):  # each step's global batch: the ranks' batches together
            net(torch.cat([_batch(r, step, sizes[r][step]) for r in range(2)]))
    for hook in hooks:
        hook.remove()
    for rank_state in results:
        for index, (mean, var) in zip((1, 3), rank_state):
            x = torch.cat(seen[index]).transpose(0, 1).flatten(1)
            _close(mean, x.mean(1), 1e-10, "running mean")
            _close(var, x.var(1), 1e-10, "running var")


def _order_rank(rank, world):
    first, second = _fused(4, "leaky_relu", 0.1), _fused(4, "leaky_relu", 0.1)
    layers = [first, second] if rank == 0 else [second, first]
    try:
        layers[0](torch.randn(3, 4, 2, 2))
    except ValueError as error:
        return str(error)
    return None


def test_ranks_that_call_layers_in_another_order_raise_on_every_rank():
    messages = run_ranks(_order_rank, 2)
    assert all(message and "different synced layers" in message for message in messages), messages


def test_state_dict_is_batchnorms():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.uniform_()
    fused = syncnorm.SyncBatchNormAct(4)
    fused.load_state_dict(bn.state_dict())  # strict: the same keys
    assert fused.state_dict().keys() == bn.state_dict().keys()
    back = nn.BatchNorm2d(4)
    back.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fused.eval()(x), F.leaky_relu(back.eval()(x), 0.01), rtol=0, atol=0)


def _inplace_rank(rank, world):
    layer = syncnorm.SyncBatchNormAct(3, inplace=True)
    errors = []
    leaf = torch.randn(4, 3, 2, 2, requires_grad=True)
    for make in (lambda: leaf, lambda: torch.sigmoid(leaf), lambda: F.leaky_relu(leaf * 1, 0.1, inplace=True)):
        try:
            layer(make())
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    x = leaf * 2
    out = layer(x)
    written = out.data_ptr() == x.data_ptr()
    # Another consumer saved the input for its backward: autograd's version check stops that backward.
    y = leaf * 2
    kept = y * leaf  # saves y
    layer(y)
    try:
        (kept.sum() + y.sum()).backward()
        late = None
    except RuntimeError as error:
        late = str(error)
    return errors, written, late


def test_inplace_writes_over_the_input_and_refuses_what_autograd_needs():
    (errors, written, late), _ = run_ranks(_inplace_rank, 2)
    assert "leaf" in errors[0]
    assert "SigmoidBackward0 saved" in errors[1]
    assert "LeakyReluBackward1 saved" in errors[2]
    assert written
    assert late is not None and "modified by an inplace operation" in late


# -- conversion ----------------------------------------------------------------------------------------------

def _convertible():
    timm = pytest.importorskip("timm")

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ELU(0.5),
        timm.layers.BatchNormAct2d(4, act_layer=nn.LeakyReLU),
        timm.layers.BatchNormAct2d(4, apply_act=False),
        timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU),  # not invertible: a plain synced layer, act kept
        nn.BatchNorm2d(4), nn.ReLU(),  # the same
        timm.layers.InplaceAbn(4, act_layer="elu", act_param=0.7),
    )
    for module in model.modules():
        if hasattr(module, "running_var"):
            with torch.no_grad():
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


def test_conversion_fuses_what_it_can_exactly_and_reverts():
    timm = pytest.importorskip("timm")

    model = _convertible()
    keys = model.state_dict().keys()
    x = torch.randn(2, 3, 9, 9)
    expected = nn.Sequential(*model[:10])(x)  # InplaceAbn cannot run without its CUDA extension
    originals = list(model)
    converted = syncnorm.convert_sync_batchnorm_act(model)
    kinds = [type(m).__name__ for m in converted]
    assert kinds == ["Conv2d", "SyncBatchNormAct", "FusedActivation", "Conv2d", "SyncBatchNormAct", "FusedActivation",
                     "SyncBatchNormAct", "SyncBatchNormAct", "SyncBatchNormAct2d", "SyncBatchNorm", "ReLU",
                     "SyncBatchNormAct"]
    assert [(m.activation, m._param()) for m in converted if type(m).__name__ == "SyncBatchNormAct"] == [
        ("leaky_relu", 0.2), ("elu", 0.5), ("leaky_relu", 0.01), ("identity", 0.0), ("elu", 0.7)]
    assert converted.state_dict().keys() == keys
    torch.testing.assert_close(nn.Sequential(*converted[:10])(x), expected, rtol=0, atol=1e-6)
    # InplaceAbn's rule |weight| + eps, against plain torch
    abn = originals[11]
    x4 = torch.randn(2, 4, 3, 3)
    reference = F.elu(F.batch_norm(x4, abn.running_mean, abn.running_var, abn.weight.abs() + abn.eps,
                                   abn.bias, False, 0.1, abn.eps), 0.7)
    torch.testing.assert_close(converted[11](x4), reference, rtol=0, atol=1e-6)
    reverted = syncnorm.revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted] == [type(m) for m in originals]
    assert reverted[2].negative_slope == 0.2 and reverted[11].act_name == "elu"
    assert reverted.state_dict().keys() == keys
    assert isinstance(reverted[6], timm.layers.BatchNormAct2d) and isinstance(reverted[6].act, nn.LeakyReLU)
    torch.testing.assert_close(nn.Sequential(*reverted[:10])(x), expected, rtol=0, atol=0)
    assert syncnorm.convert_sync_batchnorm(_convertible())[1].__class__ is syncnorm.SyncBatchNorm  # default unchanged


@pytest.mark.parametrize("bad,name", [
    (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(-0.1)), "'0'"),
    (lambda: nn.Sequential(nn.Sequential(nn.BatchNorm2d(3), nn.ELU(0.0))), "'0.0'"),
    (lambda: nn.Sequential(pytest.importorskip("timm").layers.BatchNormAct2d(3, act_layer=nn.LeakyReLU,
                                                                               drop_layer=nn.Dropout)), "'0'"),
])
def test_conversion_refuses_what_it_cannot_fuse_exactly(bad, name):
    model = bad()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=f"{name}.*nothing was changed"):
        syncnorm.convert_sync_batchnorm_act(model)
    assert [type(m) for m in model.modules()] == before


def test_saturated_elu_gives_finite_gradients():
    """ELU outputs that rounded to -alpha (z = weight * x_hat below about -17 in float32) cannot be inverted:
    the gradients stay finite."""
    x = torch.cat([torch.randn(6, 2, 4), torch.full((2, 2, 4), -1e4)]).requires_grad_()
    w = torch.full((2,), 30.0, requires_grad=True)
    out = SyncBatchNormActFunction.apply(x * 1, w, torch.zeros(2), None, None, 1e-5, 0.1, None, FUNCTIONAL, "elu",
                                         1.0, False)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
