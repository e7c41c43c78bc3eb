"""Single-process references the multi-rank tests compare against, and the per-rank side of a layer run.

The reference for SyncBatchNorm on ranks with batches ``x_0, ..., x_{W-1}`` is torch's own
``BatchNorm{1,2,3}d`` applied in one process to ``cat([x_0, ..., x_{W-1}])``: outputs and input
gradients must match slice by slice, weight/bias gradients must match their sum over ranks, and the
running statistics must match on every rank.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

import syncnorm


@dataclass
class LayerCase:
    """A multi-step training run of one layer: global batches, their split, and the layer's setup."""

    inputs: List[torch.Tensor]  # global batch per step, (N, C, *)
    grads: List[torch.Tensor]  # upstream gradient per step, same shape
    sizes: List[List[int]]  # per step, batch size of each rank (sums to N)
    kwargs: Dict = field(default_factory=dict)  # SyncBatchNorm / BatchNorm keyword arguments
    module_dtype: torch.dtype = torch.float64
    channels_last: bool = False
    eval_input: torch.Tensor = None  # global batch run in eval mode after training, if any


def bn_class(dim: int):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]


def init_affine(layer: nn.Module, channels: int) -> None:
    """Non-trivial, deterministic weight and bias so that they matter in every formula."""
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, channels))


def _format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _split(x: torch.Tensor, sizes: List[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _record_step(record, layer, output, input) -> None:
    """Keep one step's output and gradients; clear the parameter gradients for the next step."""
    record["outputs"].append(output.detach())
    record["input_grads"].append(input.grad)
    if layer.affine:
        record["weight_grads"].append(layer.weight.grad.clone())
        record["bias_grads"].append(layer.bias.grad.clone())
        layer.weight.grad = layer.bias.grad = None


def run_layer_on_rank(rank: int, world_size: int, case: LayerCase, group_ranks=None, device="cpu"):
    """Train a syncnorm layer on this rank's slices of ``case``; return what the test compares.

    ``group_ranks``: if given, a list of rank lists; the layer syncs within the list holding ``rank``
    and takes its slice by its position there. ``device``: where the layer and its inputs live (the
    record comes back on the CPU).
    """
    import torch.distributed as dist

    group, position, members = None, rank, world_size
    if group_ranks is not None:
        groups = [dist.new_group(ranks) for ranks in group_ranks]
        mine = next(i for i, ranks in enumerate(group_ranks) if rank in ranks)
        group, position, members = groups[mine], group_ranks[mine].index(rank), len(group_ranks[mine])
    channels = case.inputs[0].size(1)
    layer = syncnorm.SyncBatchNorm(channels, process_group=group, **case.kwargs).to(case.module_dtype)
    init_affine(layer, channels)
    layer.to(device)
    record = {"outputs": [], "input_grads": [], "weight_grads": [], "bias_grads": [], "formats_kept": []}
    for x, dy, sizes in zip(case.inputs, case.grads, case.sizes):
        assert len(sizes) == members
        local_x = _format(_split(x, sizes, position).to(device, copy=True), case.channels_last).requires_grad_()
        y = layer(local_x)
        y.backward(_format(_split(dy, sizes, position).to(device, copy=True), case.channels_last))
        _record_step(record, layer, y, local_x)
        record["formats_kept"].append(y.dtype == local_x.dtype and y.stride() == local_x.stride())
    record["buffers"] = {name: buf.clone() for name, buf in layer.named_buffers()}
    if case.eval_input is not None:
        layer.eval()
        sizes = case.sizes[-1]
        eval_input = _split(case.eval_input, sizes, position).to(device)
        record["eval_output"] = layer(_format(eval_input, case.channels_last))
    return _to_cpu(record)


def _to_cpu(value):
    """``value`` with every tensor in it (nested in dicts and lists) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    return value


def run_reference(case: LayerCase):
    """The same steps with torch's BatchNorm on the concatenated global batch, in one process.

    Reduced-precision inputs are compared against a float32 reference of the same values.
    """
    channels = case.inputs[0].size(1)
    ref_dtype = torch.float64 if case.inputs[0].dtype == torch.float64 else torch.float32
    layer = bn_class(case.inputs[0].dim())(channels, **case.kwargs).to(ref_dtype)
    init_affine(layer, channels)
    record = {"outputs": [], "input_grads": [], "weight_grads": [], "bias_grads": []}
    for x, dy in zip(case.inputs, case.grads):
        global_x = x.to(ref_dtype).requires_grad_()
        y = layer(global_x)
        y.backward(dy.to(ref_dtype))
        _record_step(record, layer, y, global_x)
    record["buffers"] = {name: buf.clone() for name, buf in layer.named_buffers()}
    if case.eval_input is not None:
        layer.eval()
        record["eval_output"] = layer(case.eval_input.to(ref_dtype)).detach()
    return record


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """``max|actual - expected| <= rel * max(1, max|expected|)``, compared in float64."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rel * scale, f"{what}: max abs error {error:.3g} > {rel:g} * {scale:.3g}"


def compare(case: LayerCase, per_rank, rel: float, buffer_rel: float = None) -> None:
    """Check every rank's record against the single-process reference."""
    reference = run_reference(case)
    buffer_rel = rel if buffer_rel is None else buffer_rel
    for step, sizes in enumerate(case.sizes):
        outputs = torch.cat([rank["outputs"][step] for rank in per_rank])
        grads = torch.cat([rank["input_grads"][step] for rank in per_rank])
        assert_close(outputs, reference["outputs"][step], rel, f"step {step} output")
        assert_close(grads, reference["input_grads"][step], rel, f"step {step} input grad")
        if per_rank[0]["weight_grads"]:
            weight_sum = sum(rank["weight_grads"][step] for rank in per_rank)
            bias_sum = sum(rank["bias_grads"][step] for rank in per_rank)
            assert_close(weight_sum, reference["weight_grads"][step], rel, f"step {step} weight grad")
            assert_close(bias_sum, reference["bias_grads"][step], rel, f"step {step} bias grad")
    for rank, record in enumerate(per_rank):
        assert record["buffers"].keys() == reference["buffers"].keys()
        for name, expected in reference["buffers"].items():
            assert_close(record["buffers"][name], expected, buffer_rel, f"rank {rank} {name}")
    if case.eval_input is not None:
        outputs = torch.cat([rank["eval_output"] for rank in per_rank])
        assert_close(outputs, reference["eval_output"], rel, "eval output")


def make_case(shape, sizes, steps=3, dtype=torch.float64, seed=0, **fields) -> LayerCase:
    """Random global batches with per-channel offsets and scales, so channels differ visibly."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    broadcast = [1, channels] + [1] * (len(shape) - 2)
    offsets = torch.linspace(-2.0, 3.0, channels).view(broadcast)
    scales = torch.linspace(0.5, 2.0, channels).view(broadcast)
    inputs, grads = [], []
    for step in range(steps):
        step_shape = [sum(sizes[step % len(sizes)])] + list(shape[1:])
        inputs.append((torch.randn(step_shape, generator=generator, dtype=torch.float64) * scales + offsets).to(dtype))
        grads.append(torch.randn(step_shape, generator=generator, dtype=torch.float64).to(dtype))
    step_sizes = [sizes[step % len(sizes)] for step in range(steps)]
    return LayerCase(inputs=inputs, grads=grads, sizes=step_sizes, **fields)


def use_path(path: str) -> None:
    """Select the forward's path in this process: ``"host"`` (eager CPU reads the gathered counts) or
    ``"device"`` (what CUDA tensors and torch.compile take: everything stays on the device)."""
    assert path in ("host", "device"), path
    syncnorm.functional._HOST_READS = path == "host"


def run_cases_on_rank(rank: int, world_size: int, cases: List[LayerCase], path: str = "host"):
    """``run_layer_on_rank`` for several cases in one process group (one start-up for all)."""
    use_path(path)
    return [run_layer_on_rank(rank, world_size, case) for case in cases]
