"""What activation checkpointing costs a synced model: forward + backward with and without checkpointing.

Runs on ``--world-size`` CPU ranks with gloo (spawned, one intra-op thread per rank), float32, for one
``SyncBatchNorm`` layer called through ``torch.utils.checkpoint`` (non-reentrant) at a few shapes, and
torchvision's resnet18 with every residual block checkpointed. Both variants of a case ("plain": no
checkpointing, "checkpointed") are timed round-robin in the same run (``_timing.py``: a barrier before
every timed call, the slowest rank's time, medians over ``--iters`` rounds), so their per-round ratio is
what checkpointing costs with the ``syncnorm`` that is imported (point ``PYTHONPATH`` at another checkout
to measure that one). It prints one line per case and the collectives of one checkpointed step.

    python benchmarks/bench_recompute.py                    # ~2 minutes on 2 cores
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_recompute.py
"""

import argparse
import os
import sys
from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from _launch import launch  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm import comm  # noqa: E402

LAYER_SHAPES = [(32, 64, 16, 16), (128, 84)]


class Checkpointed(nn.Module):
    """Runs ``inner`` through non-reentrant ``torch.utils.checkpoint`` when ``enabled``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.enabled = inner, True

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False) if self.enabled else self.inner(x)


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    model = syncnorm.convert_sync_batchnorm(resnet18(num_classes=10))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for index in range(len(stage)):
            stage[index] = Checkpointed(stage[index])
    return model


def _cases(args, rank: int):
    """name -> (model, this rank's input)."""
    generator = torch.Generator().manual_seed(rank)
    for shape in LAYER_SHAPES:
        yield f"layer {shape}", Checkpointed(syncnorm.SyncBatchNorm(shape[1])), torch.randn(*shape, generator=generator)
    yield f"resnet18 ({args.resnet_batch}, 3, 64, 64)", _resnet18(), torch.randn(
        args.resnet_batch, 3, 64, 64, generator=generator)


def _count_collectives(model: nn.Module, x) -> Dict[str, int]:
    counts = {"gather": 0, "sum": 0}
    originals = comm.all_gather, comm.start_sum_across_ranks

    def gather(*a, **k):
        counts["gather"] += 1
        return originals[0](*a, **k)

    def start_sum(*a, **k):
        counts["sum"] += 1
        return originals[1](*a, **k)

    comm.all_gather, comm.start_sum_across_ranks = gather, start_sum
    try:
        model(x).sum().backward()
    finally:
        comm.all_gather, comm.start_sum_across_ranks = originals
    return counts


def body(rank: int, world_size: int, args: argparse.Namespace) -> Optional[list]:
    torch.manual_seed(0)
    rows = []
    for name, model, x in _cases(args, rank):
        x.requires_grad_()
        wrappers = [m for m in model.modules() if isinstance(m, Checkpointed)]

        def variant(enabled: bool):
            def prepare():
                for wrapper in wrappers:
                    wrapper.enabled = enabled
                model.zero_grad(set_to_none=True)
                x.grad = None

            return prepare, lambda: model(x).sum().backward()

        samples = _timing.across_ranks(_timing.interleaved(
            {"plain": variant(False), "checkpointed": variant(True)}, args.iters, args.warmup))
        variant(True)[0]()
        rows.append({
            "case": name,
            "plain": _timing.summary(samples["plain"]),
            "checkpointed": _timing.summary(samples["checkpointed"]),
            "ratio": _timing.paired_ratio(samples["checkpointed"], samples["plain"]),
            "collectives": _count_collectives(model, x),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=40, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per case")
    parser.add_argument("--resnet-batch", type=int, default=8, help="per-rank batch of resnet18")
    args = parser.parse_args()
    rows = launch(body, args.world_size, args)
    if rows is None:
        return
    print(f"syncnorm from {os.path.dirname(os.path.dirname(os.path.abspath(syncnorm.__file__)))}, "
          f"torch {torch.__version__}, {args.world_size} ranks, {args.iters} rounds")
    print("case | plain ms | checkpointed ms | checkpointed / plain (paired median) | collectives per checkpointed step")
    for row in rows:
        c = row["collectives"]
        print(f"{row['case']} | {row['plain']['median_ms']:.2f} | {row['checkpointed']['median_ms']:.2f} | "
              f"{row['ratio']['median']:.3f} | {c['gather']} gathers, {c['sum']} sums")


if __name__ == "__main__":
    main()
