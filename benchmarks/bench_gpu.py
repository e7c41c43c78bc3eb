"""Forward + backward of one batch-norm layer, and one ResNet-50 training step, on one GPU: native
BatchNorm, torch's SyncBatchNorm Function and syncnorm, side by side.

Columns (every one in a 1-rank NCCL group, so the synced ones send real collectives):

* ``bn``                -- ``torch.nn.BatchNorm2d`` (cuDNN where it applies): no sync, the floor.
* ``torch_syncbn``      -- torch's own ``torch.nn.modules._functions.SyncBatchNorm`` Function, called as
                           ``torch.nn.SyncBatchNorm`` calls it with more than one rank (the module
                           itself takes the local path in a group of one): its kernels, its two
                           collectives, and its host read of the gathered counts.
* ``syncnorm``          -- ``syncnorm.SyncBatchNormFunction`` (what ``syncnorm.SyncBatchNorm`` runs when it
                           syncs) with ``comm._COLLECTIVES_AT_ONE_RANK`` set, so that its two collectives
                           are sent too.
* ``syncnorm_compiled`` -- the same layer under ``torch.compile(fullgraph=True)``.

Memory (issue 28): a stack of six conv3x3 -> norm -> LeakyReLU(0.01) blocks (64 channels, batch 32,
56x56; dry: 8 channels, batch 2, 8x8), one training step with ``syncnorm+act`` (syncnorm's Function, then
``LeakyReLU(inplace=True)``) against ``syncnorm_act`` (``syncnorm.SyncBatchNormActFunction``, which keeps only
its output for backward): ``saved MiB``, the unique storages autograd keeps (``saved_tensors_hooks``);
``peak MiB``, ``torch.cuda.max_memory_allocated`` during the step above what was allocated before it
(n/a on the CPU); ``ms/step``.

Per layer: ResNet-50's batch-norm shapes at batch 32, NCHW and channels_last (NHWC), float32 and
bfloat16 input (float32 parameters, as in mixed precision), input requiring grad, a fresh input gradient
every call. Training step: ResNet-50, batch 64, 224x224, bf16 autocast, channels_last, SGD with
momentum. Timing: variants round-robin (order rotated every round), each call between two CUDA events
after a device synchronize, medians over ``--rounds`` rounds after ``--warmup`` warm-up rounds (the
compiled variant compiles in its first warm-up call). A variant that fails is reported, not fatal.

``--dry`` runs every code path on the CPU in seconds (a 1-rank gloo group, tiny shapes, a small
ResNet with ResNet-50's blocks, a few rounds, a wall-clock timer, the ``eager`` compile backend); torch's
SyncBN kernels are CUDA-only, so its column reads n/a there. Its numbers mean nothing.

    python benchmarks/bench_gpu.py                       # on a GPU: a few minutes, most of it compiling
    python benchmarks/bench_gpu.py --dry --out /tmp/bench_gpu.json
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from bench_memory import step_memory  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm import comm, functional  # noqa: E402
from syncnorm._identity import FUNCTIONAL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["bn", "torch_syncbn", "syncnorm", "syncnorm_compiled"]
HEADINGS = {"bn": "BN (cuDNN)", "torch_syncbn": "torch SyncBN fn", "syncnorm": "syncnorm",
            "syncnorm_compiled": "compiled"}
# syncnorm's targets against torch's SyncBN Function (issue 18): eager <= 1.2x, compiled <= 1.0x.
TARGETS = {"syncnorm": 1.2, "syncnorm_compiled": 1.0}
RESNET50_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7)]
# each compiled row costs a trace: the dry run takes one per dtype, one per layout
DRY_CONFIGS = [((4, 8, 6, 6), "NCHW", "float32"), ((3, 16, 2, 2), "NHWC", "bfloat16")]
# What compiling ResNet-50's training step is expected to take on the GPU machine (a guess until measured):
# with less of the time budget left, the compiled column of the training step is skipped.
TRAIN_COMPILE_SECONDS = 120
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


class _SyncedAtOneRank(_BatchNorm):
    """BatchNorm's parameters, buffers and step count; in training the normalization is ``_synced``, a
    synced autograd Function, also in a group of one rank."""

    def _check_input_dim(self, input):
        pass

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        self.num_batches_tracked.add_(1)
        return self._synced(input)


class TorchSyncBN(_SyncedAtOneRank):
    """torch's SyncBatchNorm Function, with the arguments torch.nn.SyncBatchNorm passes it."""

    def _synced(self, input):
        return TorchSyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum,
            dist.group.WORLD, dist.get_world_size(),
        )


class SyncnormBN(_SyncedAtOneRank):
    """syncnorm's SyncBatchNormFunction: what syncnorm.SyncBatchNorm runs when it syncs."""

    def _synced(self, input):
        return syncnorm.SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum, None,
        )


class SyncnormBNAct(_SyncedAtOneRank):
    """syncnorm's fused batch norm + LeakyReLU(0.01) Function: what syncnorm.SyncBatchNormAct runs when it syncs."""

    def _synced(self, input):
        return syncnorm.act.SyncBatchNormActFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum, None,
            FUNCTIONAL, "leaky_relu", 0.01, False,
        )


NORM_CLASSES = {"bn": None, "torch_syncbn": TorchSyncBN, "syncnorm": SyncnormBN, "syncnorm_compiled": SyncnormBN}


def with_norm(model: nn.Module, variant: str) -> nn.Module:
    """``model`` with every BatchNorm2d normalizing as ``variant`` (same parameters and buffers)."""
    norm_class = NORM_CLASSES[variant]
    if norm_class is not None:
        for layer in model.modules():
            if type(layer) is nn.BatchNorm2d:
                layer.__class__ = norm_class
    return model


class Timer:
    """Seconds of one call: CUDA events around it after a synchronize, or the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, run: Callable[[], None]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def measure(runs: Dict[str, Callable[[], None]], timer: Timer, rounds: int, warmup: int,
            expected_failures=()) -> Dict[str, dict]:
    """Round-robin timing of ``runs``; per variant a ``_timing.summary`` or ``{"error": ...}``."""
    names = list(runs)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    errors: Dict[str, str] = {}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            try:
                elapsed = timer(runs[name])
            except Exception as error:
                short = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                errors[name] = short if isinstance(error, expected_failures) else traceback.format_exc()
                continue
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: {"error": errors[name]} if name in errors else
            dict(_timing.summary(samples[name]), samples_ms=[s * 1e3 for s in samples[name]]) for name in names}


def ratios(times: Dict[str, dict], over: str) -> Dict[str, dict]:
    """Ratio of medians and median of per-round ratios of every variant to ``over``."""
    result = {}
    if "median_ms" not in times.get(over, {}):
        return result
    for name, summary in times.items():
        if name != over and "median_ms" in summary:
            paired = _timing.paired_ratio(summary["samples_ms"], times[over]["samples_ms"])
            result[name] = {"of_medians": summary["median_ms"] / times[over]["median_ms"], "paired": paired}
    return result


def layer_runs(shape, layout: str, dtype: torch.dtype, device: torch.device, backend: str):
    """One layer per variant on the same input and upstream gradient."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(device, dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(device, dtype).contiguous(memory_format=LAYOUTS[layout])
    runs = {}
    for variant in VARIANTS:
        layer = with_norm(nn.BatchNorm2d(shape[1]), variant).to(device)
        if variant == "syncnorm_compiled":
            layer = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)

        def run(layer=layer):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

        runs[variant] = run
    return runs


def train_runs(device: torch.device, dry: bool, backend: str):
    """One SGD step of ResNet-50 (a small ResNet of its blocks when dry) per variant, bf16 autocast."""
    from torchvision.models.resnet import Bottleneck, ResNet

    blocks, batch, size, classes = ([1, 1, 1, 1], 2, 16, 10) if dry else ([3, 4, 6, 3], 64, 224, 1000)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    runs = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = with_norm(ResNet(Bottleneck, blocks, num_classes=classes), variant).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        forward = torch.compile(model, fullgraph=True, backend=backend) if variant == "syncnorm_compiled" else model

        def run(forward=forward, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(forward(x), target)
            loss.backward()
            optimizer.step()

        runs[variant] = run
    setup = {"model": "resnet50" if not dry else "ResNet(Bottleneck, [1, 1, 1, 1])", "batch": batch,
             "image": size, "autocast": "bfloat16", "layout": "channels_last", "optimizer": "SGD momentum 0.9"}
    return runs, setup


MEMORY_VARIANTS = {"syncnorm+act": SyncnormBN, "syncnorm_act": SyncnormBNAct}


def memory_rows(device: torch.device, dry: bool, timer: "Timer", args) -> dict:
    """Saved-for-backward bytes, peak memory and time of one training step of the six-block stack."""
    channels, shape = (8, (2, 8, 8, 8)) if dry else (64, (32, 64, 56, 56))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows, runs = {}, {}
    for variant, norm_class in MEMORY_VARIANTS.items():
        torch.manual_seed(0)
        layers: List[nn.Module] = []
        for _ in range(6):
            norm = nn.BatchNorm2d(channels)
            norm.__class__ = norm_class
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm]
            if norm_class is SyncnormBN:
                layers.append(nn.LeakyReLU(0.01, inplace=True))
        model = nn.Sequential(*layers).to(device)

        def run(model=model):
            model.zero_grad(set_to_none=True)
            model(x.clone()).sum().backward()

        run()  # warm-up: cuDNN's choices and workspaces, the allocator's first blocks
        model.zero_grad(set_to_none=True)
        saved, peak = step_memory(model, x)
        rows[variant] = {"saved_bytes": saved, "peak_bytes": peak}
        runs[variant] = run
    times = measure(runs, timer, args.rounds, args.warmup)
    for variant, summary in times.items():
        rows[variant]["times"] = summary
    base, fused = rows["syncnorm+act"], rows["syncnorm_act"]
    ratios_of = {"saved": fused["saved_bytes"] / base["saved_bytes"],
                 "peak": fused["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None}
    return {"setup": {"blocks": 6, "input": list(shape), "activation": "LeakyReLU(0.01)"}, "rows": rows,
            "fused_over_separate": ratios_of}


def meta(device: torch.device, args) -> dict:
    def nccl_version():
        try:
            version = torch.cuda.nccl.version()
            return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    return {
        "dry": args.dry,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "nccl": nccl_version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "syncnorm_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "rounds": args.rounds, "warmup": args.warmup,
        "train_rounds": args.train_rounds, "train_warmup": args.train_warmup,
        "compile_backend": args.backend, "targets_vs_torch_syncbn": TARGETS,
    }


def write_json(result: dict, path: str) -> None:
    """The JSON and, beside it (``.md``), the tables; rewritten after every row, each through a rename, so a
    run stopped by a timeout leaves what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    slim = json.loads(json.dumps(result))
    for row in slim["layers"] + ([slim["train_step"]] if slim.get("train_step") else []):
        for summary in row["times"].values():
            summary.pop("samples_ms", None)
    for row in (slim.get("memory") or {}).get("rows", {}).values():
        row["times"].pop("samples_ms", None)
    tables_path = os.path.splitext(path)[0] + ".md"
    for target, text in ((path, json.dumps(slim, indent=1)), (tables_path, tables(result) + "\n")):
        with open(target + ".tmp", "w") as f:
            f.write(text)
        os.replace(target + ".tmp", target)


def cell(summary: Optional[dict]) -> str:
    return f"{summary['median_ms']:.3f}" if summary and "median_ms" in summary else "n/a"


def ratio_cell(ratios_of_row: Dict[str, dict], name: str, over: str) -> str:
    """The ratio of medians to ``over``; "1" for ``over`` itself when the row has ratios at all."""
    if name == over and ratios_of_row:
        return "1"
    ratio = ratios_of_row.get(name)
    return f"{ratio['of_medians']:.2f}" if ratio else "n/a"


def tables(result: dict) -> str:
    """The per-layer and training tables, markdown."""
    lines = ["| shape | layout | dtype | " + " | ".join(HEADINGS[v] for v in VARIANTS)
             + " | syncnorm / torch | compiled / torch |",
             "|---|---|---|" + "---:|" * (len(VARIANTS) + 2)]
    for row in result["layers"]:
        over_torch = row["ratios_vs_torch_syncbn"]
        lines.append(f"| ({', '.join(map(str, row['shape']))}) | {row['layout']} | {row['dtype']} | "
                     + " | ".join(cell(row["times"].get(v)) for v in VARIANTS)
                     + f" | {ratio_cell(over_torch, 'syncnorm', '')} | {ratio_cell(over_torch, 'syncnorm_compiled', '')} |")
    train = result.get("train_step")
    if train:
        setup = train["setup"]
        lines += ["", f"Training step: {setup['model']}, batch {setup['batch']}, {setup['image']}x{setup['image']}, "
                  f"{setup['autocast']} autocast, {setup['layout']}, {setup['optimizer']} (median)", "",
                  "| variant | ms/step | images/s | / BN | / torch SyncBN fn |", "|---|---:|---:|---:|---:|"]
        for variant in VARIANTS:
            summary = train["times"][variant]
            images = f"{setup['batch'] / summary['median_ms'] * 1e3:.0f}" if "median_ms" in summary else "n/a"
            lines.append(f"| {HEADINGS[variant]} | {cell(summary)} | {images} | "
                         f"{ratio_cell(train['ratios_vs_bn'], variant, 'bn')} | "
                         f"{ratio_cell(train['ratios_vs_torch_syncbn'], variant, 'torch_syncbn')} |")
    memory = result.get("memory")
    if memory:
        mib = lambda value: "n/a" if value is None else f"{value / 2 ** 20:.2f}"  # noqa: E731
        setup = memory["setup"]
        lines += ["", f"Memory: {setup['blocks']} conv3x3 -> norm -> {setup['activation']} blocks, input "
                  f"({', '.join(map(str, setup['input']))}), one training step", "",
                  "| variant | saved MiB | peak MiB | ms/step |", "|---|---:|---:|---:|"]
        for variant, row in memory["rows"].items():
            lines.append(f"| {variant} | {mib(row['saved_bytes'])} | {mib(row['peak_bytes'])} | "
                         f"{cell(row['times'])} |")
        ratio = memory["fused_over_separate"]
        lines.append(f"| syncnorm_act / syncnorm+act | {ratio['saved']:.2f} | "
                     f"{'n/a' if ratio['peak'] is None else format(ratio['peak'], '.2f')} | |")
    return "\n".join(lines)


def targets_summary(result: dict) -> List[str]:
    """One line per target: on how many layer rows it is met."""
    lines = []
    for name, target in TARGETS.items():
        values = [row["ratios_vs_torch_syncbn"][name]["of_medians"] for row in result["layers"]
                  if name in row["ratios_vs_torch_syncbn"]]
        met = sum(value <= target for value in values)
        lines.append(f"{name} / torch SyncBN fn <= {target}: met on {met} of {len(values)} layer rows"
                     + (f" (range {min(values):.2f}-{max(values):.2f})" if values else ""))
    return lines


def train_step(result: dict, args, device: torch.device, timer: Timer, expected, started: float) -> List[tuple]:
    """The training-step row: the eager variants first (written at once), then all four with the compiled
    one, which compiles in its first warm-up step, unless too little of the time budget is left for that.
    A timeout during the compilation still leaves the eager columns."""
    torch._dynamo.reset()
    runs, setup = train_runs(device, args.dry, args.backend)

    def record(times):
        result["train_step"] = {"setup": setup, "times": times, "ratios_vs_bn": ratios(times, "bn"),
                                "ratios_vs_torch_syncbn": ratios(times, "torch_syncbn")}
        write_json(result, args.out)

    eager = {name: run for name, run in runs.items() if name != "syncnorm_compiled"}
    times = measure(eager, timer, args.train_rounds, args.train_warmup, expected)
    left = args.time_budget - (time.monotonic() - started)
    if args.time_budget and not args.dry and left < TRAIN_COMPILE_SECONDS:
        times["syncnorm_compiled"] = {"skipped": "time budget"}
        result["skipped"].append(f"training step, compiled: {left:.0f} s of the time budget left")
        record(times)
    else:
        times["syncnorm_compiled"] = {"skipped": "not measured yet"}
        record(times)
        times = measure(runs, timer, args.train_rounds, args.train_warmup, expected)
        record(times)
    return unexpected_errors("training step", times, args.dry)


def unexpected_errors(label: str, times: Dict[str, dict], dry: bool) -> List[tuple]:
    """(what, traceback) of every variant that failed, except torch's SyncBN kernels on the CPU."""
    return [(f"{label} {name}", summary["error"]) for name, summary in times.items()
            if "error" in summary and not (dry and name == "torch_syncbn")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, few rounds: checks the code only")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu", "bench_gpu.json"), help="JSON output")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per layer (default 100; dry 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds per layer (default 10; dry 1)")
    parser.add_argument("--train-rounds", type=int, default=None, help="timed training steps (default 20; dry 2)")
    parser.add_argument("--train-warmup", type=int, default=None, help="warm-up training steps (default 5; dry 1)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds; later rows are skipped (and say so) once it is spent; 0: no limit")
    parser.add_argument("--skip-layers", action="store_true", help="leave out the per-layer table")
    parser.add_argument("--skip-train", action="store_true", help="leave out the training step")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory table")
    args = parser.parse_args(argv)
    defaults = {"rounds": (100, 3), "warmup": (10, 1), "train_rounds": (20, 2), "train_warmup": (5, 1)}
    for name, (full, dry) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry else full)
    # eager backend when dry: dynamo still has to take each layer and the model as one graph
    args.backend = "eager" if args.dry else "inductor"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if not args.dry and not torch.cuda.is_available():
        print("bench_gpu.py: expected a CUDA device (got none); --dry runs the code on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    if args.dry:
        torch.set_num_threads(1)  # the dry run shares a small CI machine; more threads only contend
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    backend = "gloo" if args.dry else "nccl"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    comm._COLLECTIVES_AT_ONE_RANK = True  # see the module docstring: syncnorm sends its collectives too
    functional._HOST_READS = False  # on the CPU too, the path CUDA tensors take
    expected = (NotImplementedError,) if args.dry else ()  # torch's SyncBN kernels on the CPU
    timer = Timer(device)
    result = {"meta": meta(device, args), "layers": [], "train_step": None, "memory": None, "skipped": []}
    print(f"bench_gpu: {result['meta']['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"NCCL {result['meta']['nccl']}, {'DRY RUN on the CPU' if args.dry else 'CUDA events'}", flush=True)
    out_of_time = lambda: args.time_budget and time.monotonic() - started > args.time_budget  # noqa: E731
    failures = []
    try:
        configs = [] if args.skip_layers else DRY_CONFIGS if args.dry else [
            (shape, layout, dtype) for dtype in DTYPES for layout in LAYOUTS for shape in RESNET50_SHAPES]
        for shape, layout, dtype_name in configs:
            label = f"({', '.join(map(str, shape))}) {layout} {dtype_name}"
            if out_of_time():
                result["skipped"].append(f"layer {label}: time budget spent")
                continue
            torch._dynamo.reset()  # one compiled layer per row, far from the recompilation limit
            runs = layer_runs(shape, layout, DTYPES[dtype_name], device, args.backend)
            times = measure(runs, timer, args.rounds, args.warmup, expected)
            row = {"shape": list(shape), "layout": layout, "dtype": dtype_name, "times": times,
                   "ratios_vs_bn": ratios(times, "bn"), "ratios_vs_torch_syncbn": ratios(times, "torch_syncbn")}
            result["layers"].append(row)
            write_json(result, args.out)
            failures += unexpected_errors(f"layer {label}", times, args.dry)
            print(f"layer {label}: " + ", ".join(f"{name} {cell(s)}" for name, s in times.items()), flush=True)
        if not args.skip_memory:
            if out_of_time():
                result["skipped"].append("memory: time budget spent")
            else:
                result["memory"] = memory_rows(device, args.dry, timer, args)
                write_json(result, args.out)
        if not args.skip_train:
            if out_of_time():
                result["skipped"].append("training step: time budget spent")
            else:
                failures += train_step(result, args, device, timer, expected, started)
    finally:
        result["seconds"] = round(time.monotonic() - started, 1)
        write_json(result, args.out)
        dist.destroy_process_group()

    print()
    print(tables(result))
    print()
    for line in targets_summary(result) + [f"skipped: {s}" for s in result["skipped"]]:
        print(line)
    for name, error in failures:
        print(f"FAILED: {name}\n{error}")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
