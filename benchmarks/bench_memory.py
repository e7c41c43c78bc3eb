"""Memory kept for backward and step time: SyncBatchNorm + activation against SyncBatchNormAct.

Runs on ``--world-size`` CPU ranks with gloo (spawned here, or under ``torchrun --nproc-per-node N``), one
intra-op thread per rank, float32. Three models, each built four ways:

* ``bn+act``          -- ``syncnorm.SyncBatchNorm`` followed by ``nn.LeakyReLU(0.01)``;
* ``bn+act(inplace)`` -- the same with ``nn.LeakyReLU(0.01, inplace=True)``;
* ``fused``           -- ``syncnorm.SyncBatchNormAct`` (saves only its output for backward);
* ``fused(inplace)``  -- ``syncnorm.SyncBatchNormAct(inplace=True)`` (also writes over its input);

and ``bn+act(inplace)`` and ``fused`` once more under ``torch.compile(fullgraph=True)`` (``--no-compile``
leaves those out). Models: ``six-block`` (six conv3x3 -> norm -> LeakyReLU blocks of 32 channels, input
``(8, 32, 32, 32)`` per rank), ``resnet`` (a ResNet-style network with LeakyReLU: stem and four basic
blocks; the second norm of each block is followed by the residual add, so it fuses with the identity
activation), ``lenet`` (LeNet-BN with LeakyReLU, input ``(64, 1, 28, 28)``).

Columns: ``saved MiB`` -- the bytes of the unique storages autograd keeps for backward in one training
step (``torch.autograd.graph.saved_tensors_hooks`` during the forward; eager only: a compiled graph keeps
its own), and its ratio to ``bn+act(inplace)``; ``step ms`` -- forward + backward of a sum loss, the
slowest rank's time, median over ``--iters`` rounds, the variants interleaved round-robin
(``_timing.py``); ``x eager`` / ``x compiled`` -- the median of the per-round paired ratios to
``bn+act(inplace)`` eager / compiled. Targets (issue 28): saved bytes <= 0.55x on ``six-block``, step time
<= 1.15x eager and <= 1.0x compiled.

    python benchmarks/bench_memory.py                  # 2 ranks: ~25 minutes on a loaded 2-core machine (compiling)
    python benchmarks/bench_memory.py --quick --no-compile
"""

import argparse
import datetime
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from _launch import launch, results_path  # noqa: E402

import syncnorm  # noqa: E402

SLOPE = 0.01
VARIANTS = ("bn+act", "bn+act(inplace)", "fused", "fused(inplace)")
COMPILED = ("bn+act(inplace)", "fused")
BASELINE = "bn+act(inplace)"


def norm_act(variant: str, channels: int, activation: str = "leaky_relu") -> nn.Module:
    """Norm + activation as ``variant`` builds it (``activation="identity"``: the norm alone)."""
    if variant.startswith("fused"):
        return syncnorm.SyncBatchNormAct(channels, activation=activation, negative_slope=SLOPE,
                                         inplace=variant.endswith("(inplace)"))
    norm = syncnorm.SyncBatchNorm(channels)
    if activation == "identity":
        return norm
    return nn.Sequential(norm, nn.LeakyReLU(SLOPE, inplace=variant.endswith("(inplace)")))


def six_block(variant: str) -> nn.Module:
    layers: List[nn.Module] = []
    for _ in range(6):
        layers += [nn.Conv2d(32, 32, 3, padding=1, bias=False), norm_act(variant, 32)]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, variant: str, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = norm_act(variant, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = norm_act(variant, channels, "identity")
        self.act = nn.LeakyReLU(SLOPE, inplace=True)

    def forward(self, x):
        return self.act(self.norm2(self.conv2(self.norm1(self.conv1(x)))) + x)


def resnet(variant: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), norm_act(variant, 32),
                         *[_Block(variant, 32) for _ in range(4)], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def lenet(variant: str) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), norm_act(variant, 6), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), norm_act(variant, 16),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 120), norm_act(variant, 120), nn.Linear(120, 84),
        norm_act(variant, 84), nn.Linear(84, 10),
    )


MODELS: Dict[str, tuple] = {
    "six-block": (six_block, (8, 32, 32, 32)),
    "resnet": (resnet, (8, 3, 32, 32)),
    "lenet": (lenet, (64, 1, 28, 28)),
}


def step_memory(model: nn.Module, x: torch.Tensor) -> Tuple[int, Optional[int]]:
    """One forward + backward of ``model`` (sum loss): the bytes of the distinct storages autograd keeps for
    backward, and on CUDA the step's peak allocated memory above what was allocated before it (else None)."""
    storages: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device) if cuda else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x.clone()).sum()
    loss.backward()
    return sum(storages.values()), torch.cuda.max_memory_allocated(x.device) - before if cuda else None


def _step(model: Callable, x: torch.Tensor, params) -> Callable[[], None]:
    def run():
        for p in params:
            p.grad = None
        model(x.clone()).sum().backward()
    return run


def body(rank: int, world_size: int, args: argparse.Namespace) -> Optional[dict]:
    report = []
    for name in args.models:
        build, shape = MODELS[name]
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=generator)
        variants, memory = {}, {}
        for variant in VARIANTS:
            torch.manual_seed(0)
            model = build(variant)
            memory[variant] = step_memory(model, x)[0]
            variants[variant] = (None, _step(model, x, list(model.parameters())))
            if args.compile and variant in COMPILED:
                torch.manual_seed(0)
                model = build(variant)
                compiled = torch.compile(model, fullgraph=True)
                variants[f"{variant} compiled"] = (None, _step(compiled, x, list(model.parameters())))
        samples = _timing.across_ranks(_timing.interleaved(variants, args.iters, args.warmup))
        entry = {"model": name, "input_per_rank": list(shape), "saved_bytes": memory,
                 "times": {v: _timing.summary(s) for v, s in samples.items()}, "ratios": {}}
        for v in samples:
            base = f"{BASELINE} compiled" if v.endswith("compiled") else BASELINE
            entry["ratios"][v] = _timing.paired_ratio(samples[v], samples[base])
        report.append(entry)
    return {"models": report}


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=(f"saved-for-backward MiB per step (unique storages) and step time, ms (median, p25-p75), "
                         f"{report['world_size']} gloo ranks x 1 thread, {report['iters']} rounds; x: paired "
                         f"ratio to {BASELINE} (eager, or compiled for compiled rows)"), show_lines=True)
    for column in ("model", "variant", "saved MiB", "x saved", "step ms", "x time"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    for entry in report["models"]:
        for variant, t in entry["times"].items():
            saved = entry["saved_bytes"].get(variant)
            ratio = entry["ratios"][variant]["median"]
            saved_cells = ["", ""] if saved is None else [
                f"{saved / 2 ** 20:.2f}", f"{saved / entry['saved_bytes'][BASELINE]:.2f}"]
            table.add_row(entry["model"], variant, *saved_cells,
                          f"{t['median_ms']:.1f}\n[dim]{t['p25_ms']:.1f}-{t['p75_ms']:.1f}[/dim]", f"{ratio:.3f}")
    Console(width=max(110, Console().width)).print(table)


def markdown(report: dict) -> str:
    """The table as markdown (what docs/performance.md shows)."""
    lines = ["| model | variant | saved MiB | x saved | step ms | x time |", "|---|---|---:|---:|---:|---:|"]
    for entry in report["models"]:
        for variant, t in entry["times"].items():
            saved = entry["saved_bytes"].get(variant)
            cells = ["", ""] if saved is None else [f"{saved / 2 ** 20:.2f}",
                                                    f"{saved / entry['saved_bytes'][BASELINE]:.2f}"]
            lines.append(f"| {entry['model']} | {variant} | {' | '.join(cells)} | {t['median_ms']:.1f} | "
                         f"{entry['ratios'][variant]['median']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn (torchrun: ignored)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--iters", type=int, default=20, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per model (compiling included)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 rounds, 1 warm-up")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled rows")
    parser.add_argument("--name", default="bench_memory", help="results file name (without extension)")
    parser.add_argument("--update-results", action="store_true",
                        help="write to benchmarks/results/ (the committed results) instead of runs/benchmarks/")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 4, 1
    started = datetime.datetime.now(datetime.timezone.utc)
    result = launch(body, args.world_size, args)
    if result is None:
        return
    report = {"benchmark": "bench_memory", "started_utc": started.isoformat(timespec="seconds"),
              "world_size": args.world_size, "iters": args.iters, "warmup": args.warmup,
              "torch": torch.__version__, "cores": os.cpu_count(), **result}
    _print_table(report)
    path = results_path(args.name, args.update_results) + ".json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(markdown(report))
    print(f"results: {os.path.relpath(path)} (and .md)")


if __name__ == "__main__":
    main()
