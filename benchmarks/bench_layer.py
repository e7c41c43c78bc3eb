"""Per-layer forward+backward time of syncnorm's SyncBatchNorm against its floor and two peer algorithms.

Runs on ``--world-size`` CPU ranks with gloo (spawned here, or under ``torchrun --nproc-per-node N``),
one intra-op thread per rank, float32, for LeNet-BN's four batch-norm shapes at per-rank batch
``--batch`` and one ResNet-like shape, each contiguous and (4-D only) channels_last. All columns are
measured in the same run, round-robin (see ``_timing.py``), a barrier before every timed call; a time
is the slowest rank's, median over ``--iters`` rounds after ``--warmup``.

Columns (forward + backward of one layer, input requires grad, fresh gradients every call):

* ``local``     -- ``torch.nn.BatchNorm`` on each rank's own batch (no sync).
* ``floor``     -- local native batch norm (``native_batch_norm`` + its native backward) plus exactly
                   the two collectives syncnorm sends, of the same sizes, issued from inside an
                   autograd Function: forward all_gather of 1+2C floats, backward sum of 2C floats
                   (through ``syncnorm.comm``, so the all_reduce / all_gather+sum switch applies).
* ``syncnorm``  -- ``syncnorm.SyncBatchNorm``.
* ``compiled``  -- ``torch.compile(syncnorm.SyncBatchNorm(...), fullgraph=True)`` (compiled during the
                   warm-up rounds; ``--no-compile`` leaves it out).
* ``separate``  -- the "separate collectives" algorithm of the common SyncBN walk-throughs (as in
                   ``torch.nn.SyncBatchNorm`` on CUDA): three all_gathers (count, mean, invstd) in
                   forward, two all_reduces (sum_dy, sum_dy_xmu) in backward. Written here with the
                   same fast native kernels syncnorm uses, so only the algorithm differs.
* ``naive``     -- the detection-codebase algorithm: all_reduce of [mean, mean of squares] through a
                   differentiable all_reduce (a second all_reduce in backward), composite ops with
                   autograd. Exact only for equal per-rank batches.
* ``ag(1+2C)``, ``ar(2C)``, ``ag+sum(2C)`` -- the bare collectives, for reference: the forward
  all_gather, and the two ways to sum the backward's 2C floats.

    python benchmarks/bench_layer.py                 # 2 ranks, ~5 minutes (compiling included)
    python benchmarks/bench_layer.py --quick         # smoke run, ~2 minutes
    torchrun --nproc-per-node 2 benchmarks/bench_layer.py --iters 300
"""

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from _launch import launch, results_path  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm import comm  # noqa: E402

EPS = 1e-5
MOMENTUM = 0.1
ALWAYS_GATHER = 1 << 30  # a GATHER_SUM_MAX_WORLD above any world size


def _reduce_dims(x: Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


class _BN(_BatchNorm):
    """A BatchNorm-shaped module (parameters, buffers) whose forward is a given autograd Function.

    It keeps BatchNorm's module-level bookkeeping (``num_batches_tracked``), so that module overhead
    is alike in every column.
    """

    function = None

    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def forward(self, input: Tensor) -> Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return self.function.apply(input, self.weight, self.bias, self.running_mean, self.running_var)


# ---------------------------------------------------------------------------------------------------
# The floor: what any synchronized batch norm must at least cost here.


class _FloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var):
        out, save_mean, save_invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS
        )
        # The statistics packet syncnorm sends: 1 + 2C floats.
        comm.all_gather(torch.empty(1 + 2 * x.size(1)), None)
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        grad_in, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, save_mean, save_invstd, True, EPS, [True, True, True]
        )
        # The gradient sums syncnorm sends: 2C floats.
        comm.sum_across_ranks(torch.empty(2 * x.size(1)), None)
        return grad_in, grad_w, grad_b, None, None


class FloorBN(_BN):
    function = _FloorFunction


# ---------------------------------------------------------------------------------------------------
# Peer 1: separate collectives (3 all_gathers forward, 2 all_reduces backward).


# torch 2.14 renamed all_gather_into_tensor (older releases only have the old name).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather(t: Tensor) -> Tensor:
    world = dist.get_world_size()
    out = t.new_empty(world * t.numel())
    _all_gather_flat(out, t)
    return out.view(world, t.numel())


class _SeparateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var):
        count = x.numel() // x.size(1)
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        invstd = torch.rsqrt(var + EPS)
        counts = _gather(torch.full((1,), float(count)))
        means = _gather(mean)
        invstds = _gather(invstd)
        # batch_norm_gather_stats_with_counts: per-rank variance back from invstd, parallel combine.
        counts = counts.view(-1, 1)
        total = counts.sum()
        g_mean = (means * counts).sum(0) / total
        vars = invstds.pow(-2) - EPS
        g_var = ((vars + (means - g_mean) ** 2) * counts).sum(0) / total
        g_invstd = torch.rsqrt(g_var + EPS)
        n = int(total.item())
        with torch.no_grad():
            running_mean.mul_(1 - MOMENTUM).add_(g_mean, alpha=MOMENTUM)
            running_var.mul_(1 - MOMENTUM).add_(g_var * (n / (n - 1)), alpha=MOMENTUM)
        ctx.save_for_backward(x, weight, g_mean, g_invstd)
        ctx.total = n
        return F.batch_norm(x, g_mean, g_var, weight, bias, False, 0.0, EPS)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        ones = torch.ones_like(mean)
        # batch_norm_backward_reduce: local sum(dy) and sum(dy * (x - mean)) in one native pass.
        _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, None, mean, ones, None, None, False, 0.0, [False, True, True]
        )
        grad_w = sum_dy_xmu * invstd
        grad_b = sum_dy.clone()
        dist.all_reduce(sum_dy)
        dist.all_reduce(sum_dy_xmu)
        # batch_norm_backward_elemt: dx = w*invstd*(dy - mean_dy - (x - mean)*invstd^2*mean_dy_xmu).
        scale = invstd * weight
        slope = -scale * invstd * invstd * sum_dy_xmu / ctx.total
        offset = -scale * sum_dy / ctx.total
        grad_in = F.batch_norm(x, mean, ones, slope, offset, False, 0.0, 0.0)
        grad_in.addcmul_(grad_out, _channel_view(scale, x))
        return grad_in, grad_w, grad_b, None, None


class SeparateCollectivesBN(_BN):
    function = _SeparateFunction


# ---------------------------------------------------------------------------------------------------
# Peer 2: naive (all_reduce of [mean, mean of x^2] through a differentiable all_reduce).


class _DifferentiableAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class NaiveSyncBN(_BatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        dims = _reduce_dims(x)
        channels = x.size(1)
        mean = x.mean(dims)
        meansqr = (x * x).mean(dims)
        vec = _DifferentiableAllReduce.apply(torch.cat([mean, meansqr])) * (1.0 / dist.get_world_size())
        mean, meansqr = vec.split(channels)
        var = meansqr - mean * mean
        with torch.no_grad():
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            self.running_var += self.momentum * (var.detach() - self.running_var)
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        shift = self.bias - mean * scale
        return x * _channel_view(scale, x) + _channel_view(shift, x)


# ---------------------------------------------------------------------------------------------------


def _local_bn(channels: int, dims: int) -> torch.nn.Module:
    return (torch.nn.BatchNorm2d if dims == 4 else torch.nn.BatchNorm1d)(channels, EPS, MOMENTUM)


def _configs(batch: int, resnet: Tuple[int, ...]) -> List[Tuple[Tuple[int, ...], str]]:
    shapes = [(batch, 6, 24, 24), (batch, 16, 8, 8), (batch, 120), (batch, 84), tuple(resnet)]
    configs = []
    for shape in shapes:
        configs.append((shape, "contiguous"))
        if len(shape) == 4:
            configs.append((shape, "channels_last"))
    return configs


def _layer_variant(module: torch.nn.Module, x: Tensor, grad: Tensor, before=None, after=None):
    def prepare():
        x.grad = None
        module.zero_grad(set_to_none=True)

    def run():
        if before is not None:
            before()
        module(x).backward(grad)
        if after is not None:
            after()

    return prepare, run


def _collective_variants(channels: int) -> Dict[str, _timing.Variant]:
    """The bare collectives through ``syncnorm.comm``, i.e. with exactly the Python around them that a
    layer pays: the forward gather, and the backward sum forced to each strategy."""
    packet = torch.randn(1 + 2 * channels)
    sums = torch.zeros(2 * channels)  # zeros: the in-place all_reduce leaves them unchanged

    def gather_packet():
        comm.all_gather(packet, None)

    def forced_sum(switch):
        def run():
            saved, comm.GATHER_SUM_MAX_WORLD = comm.GATHER_SUM_MAX_WORLD, switch
            try:
                comm.sum_across_ranks(sums, None)
            finally:
                comm.GATHER_SUM_MAX_WORLD = saved

        return run

    return {
        "ag(1+2C)": (None, gather_packet),
        "ar(2C)": (None, forced_sum(0)),
        "ag+sum(2C)": (None, forced_sum(ALWAYS_GATHER)),
    }


def collectives_body(rank: int, world_size: int, args: argparse.Namespace) -> Optional[dict]:
    """Only the bare collectives, for a range of channel counts: all_reduce vs all_gather + sum."""
    results = []
    for channels in args.channels:
        samples = _timing.across_ranks(_timing.interleaved(_collective_variants(channels), args.iters, args.warmup))
        results.append({"channels": channels, "times": {n: _timing.summary(v) for n, v in samples.items()}})
        if rank == 0 and args.progress:
            t = results[-1]["times"]
            print(f"  C={channels:5d}  " + "  ".join(f"{n} {t[n]['median_ms']:.3f} ms" for n in t), flush=True)
    return {"collectives": results, "gather_sum_max_world": comm.GATHER_SUM_MAX_WORLD}


def body(rank: int, world_size: int, args: argparse.Namespace) -> Optional[dict]:
    if args.gather_sum_max_world is not None:
        comm.GATHER_SUM_MAX_WORLD = args.gather_sum_max_world
    default_switch = comm.GATHER_SUM_MAX_WORLD
    results = []
    for shape, layout in _configs(args.batch, args.resnet_shape):
        torch.manual_seed(1000 + rank)
        channels = shape[1]
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
        grad = torch.randn(shape).contiguous(memory_format=memory_format)

        variants: Dict[str, _timing.Variant] = {
            "local": _layer_variant(_local_bn(channels, len(shape)), x, grad),
            "floor": _layer_variant(FloorBN(channels, EPS, MOMENTUM), x, grad),
            "syncnorm": _layer_variant(syncnorm.SyncBatchNorm(channels, EPS, MOMENTUM), x, grad),
        }
        if args.compile:
            torch._dynamo.reset()  # a fresh graph per shape, compiled in the warm-up rounds
            compiled = torch.compile(syncnorm.SyncBatchNorm(channels, EPS, MOMENTUM), fullgraph=True)
            variants["compiled"] = _layer_variant(compiled, x, grad)
        if args.compare_sum:
            # The same layer with each backward-sum strategy forced (and the floor likewise).
            for label, switch in (("ar", 0), ("ag", ALWAYS_GATHER)):
                def force(switch=switch):
                    comm.GATHER_SUM_MAX_WORLD = switch

                def restore():
                    comm.GATHER_SUM_MAX_WORLD = default_switch

                variants[f"syncnorm[{label}]"] = _layer_variant(
                    syncnorm.SyncBatchNorm(channels, EPS, MOMENTUM), x, grad, force, restore
                )
                variants[f"floor[{label}]"] = _layer_variant(
                    FloorBN(channels, EPS, MOMENTUM), x, grad, force, restore
                )
        variants["separate"] = _layer_variant(SeparateCollectivesBN(channels, EPS, MOMENTUM), x, grad)
        variants["naive"] = _layer_variant(NaiveSyncBN(channels, EPS, MOMENTUM), x, grad)
        variants.update(_collective_variants(channels))

        samples = _timing.across_ranks(_timing.interleaved(variants, args.iters, args.warmup))
        entry = {
            "shape": list(shape),
            "layout": layout,
            "times": {name: _timing.summary(values) for name, values in samples.items()},
            "syncnorm_over_floor": _ratio(samples, "syncnorm", "floor"),
        }
        if args.compile:
            entry["compiled_over_floor"] = _ratio(samples, "compiled", "floor")
        for peer in ("separate", "naive"):
            entry[f"syncnorm_over_{peer}"] = _ratio(samples, "syncnorm", peer)
        if args.compare_sum:
            for label in ("ar", "ag"):
                entry[f"syncnorm[{label}]_over_floor[{label}]"] = _ratio(
                    samples, f"syncnorm[{label}]", f"floor[{label}]"
                )
        results.append(entry)
        if rank == 0 and args.progress:
            t = entry["times"]
            print(
                f"  {str(list(shape)):>18} {layout:<13} floor {t['floor']['median_ms']:.3f} ms  "
                f"syncnorm {t['syncnorm']['median_ms']:.3f} ms  "
                f"ratio {entry['syncnorm_over_floor']['paired']['median']:.3f}"
                + (f"  compiled {t['compiled']['median_ms']:.3f} ms  ratio "
                   f"{entry['compiled_over_floor']['paired']['median']:.3f}" if args.compile else ""),
                flush=True,
            )
    return {"configs": results, "gather_sum_max_world": default_switch}


def _ratio(samples: Dict[str, List[float]], numerator: str, denominator: str) -> Dict[str, float]:
    medians = [_timing.summary(samples[name])["median_ms"] for name in (numerator, denominator)]
    return {"of_medians": medians[0] / medians[1], "paired": _timing.paired_ratio(samples[numerator],
                                                                                   samples[denominator])}


def _machine() -> Dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    configs = report["configs"]
    names = list(configs[0]["times"])
    table = Table(
        title=(
            f"syncnorm per-layer forward+backward, ms (median, p25-p75 below), {report['world_size']} gloo "
            f"ranks x {report['threads']} thread, {report['iters']} rounds; x/floor: median of the "
            f"per-round paired ratios (p25-p75 below)"
        ),
        show_lines=True,
    )
    table.add_column("shape")
    table.add_column("layout")
    for name in names:
        table.add_column(name, justify="right")
        if name in ("syncnorm", "compiled"):
            table.add_column(f"{name[:4]}/floor", justify="right")
    for entry in configs:
        row = [str(tuple(entry["shape"])), "NHWC" if entry["layout"] == "channels_last" else "NCHW"]
        for name in names:
            t = entry["times"][name]
            row.append(f"{t['median_ms']:.3f}\n[dim]{t['p25_ms']:.2f}-{t['p75_ms']:.2f}[/dim]")
            if name in ("syncnorm", "compiled"):
                # The targets: eager <= 1.10x the floor, compiled <= 1.00x, as medians of paired ratios.
                paired = entry[f"{name}_over_floor"]["paired"]
                color = "green" if paired["median"] <= (1.10 if name == "syncnorm" else 1.00) else "red"
                row.append(f"[{color}]{paired['median']:.3f}[/{color}]\n[dim]{paired['p25']:.2f}-{paired['p75']:.2f}[/dim]")
        table.add_row(*row)
    Console(width=max(36 + 13 * (len(names) + 1), Console().width)).print(table)


def _print_collectives(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bare collectives, ms (median, p25-p75), {report['world_size']} gloo ranks, "
                        f"{report['iters']} rounds")
    table.add_column("C", justify="right")
    names = list(report["collectives"][0]["times"])
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("ag+sum / ar", justify="right")
    for entry in report["collectives"]:
        t = entry["times"]
        cells = [f"{t[n]['median_ms']:.3f} [dim]{t[n]['p25_ms']:.2f}-{t[n]['p75_ms']:.2f}[/dim]" for n in names]
        cells.append(f"{t['ag+sum(2C)']['median_ms'] / t['ar(2C)']['median_ms']:.2f}")
        table.add_row(str(entry["channels"]), *cells)
    Console(width=max(120, Console().width)).print(table)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn (torchrun: ignored)")
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch for the LeNet shapes")
    parser.add_argument("--resnet-shape", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=(8, 64, 56, 56), help="the ResNet-like shape, N,C,H,W")
    parser.add_argument("--iters", type=int, default=150, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=15, help="untimed rounds per shape")
    parser.add_argument("--quick", action="store_true", help="smoke run: 25 rounds, 5 warm-up")
    parser.add_argument("--compare-sum", action="store_true",
                        help="also time syncnorm and the floor with the backward sum forced to all_reduce "
                             "and to all_gather+local sum")
    parser.add_argument("--gather-sum-max-world", type=int, default=None,
                        help="override syncnorm.comm.GATHER_SUM_MAX_WORLD for this run")
    parser.add_argument("--collectives-only", action="store_true",
                        help="time only all_gather(1+2C), all_reduce(2C) and all_gather(2C)+sum for --channels "
                             "(to choose GATHER_SUM_MAX_WORLD at a given world size)")
    parser.add_argument("--channels", type=lambda s: [int(v) for v in s.split(",")],
                        default=[6, 16, 64, 120, 256, 512, 2048], help="channel counts for --collectives-only")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the torch.compile column")
    parser.add_argument("--update-results", action="store_true",
                        help="write to benchmarks/results/ (the committed results) instead of runs/benchmarks/")
    parser.add_argument("--json", default=None,
                        help="where rank 0 writes the results (default runs/benchmarks/bench_layer.json, "
                             "bench_layer_collectives.json with --collectives-only)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 25, 5

    if args.json is None:
        name = "bench_layer_collectives" if args.collectives_only else "bench_layer"
        args.json = results_path(name, args.update_results) + ".json"

    started = datetime.datetime.now(datetime.timezone.utc)
    result = launch(collectives_body if args.collectives_only else body, args.world_size, args)
    if result is None:
        return
    report = {
        "benchmark": "bench_layer",
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "world_size": dist.get_world_size() if dist.is_initialized() else args.world_size,
        "threads": 1,
        "backend": "gloo",
        "dtype": "float32",
        "iters": args.iters,
        "warmup": args.warmup,
        "timing": "per-round max over ranks of perf_counter around forward+backward, barrier before each",
        "machine": _machine(),
        **result,
    }
    if os.environ.get("WORLD_SIZE"):
        report["world_size"] = int(os.environ["WORLD_SIZE"])
    if args.collectives_only:
        _print_collectives(report)
    else:
        _print_table(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
