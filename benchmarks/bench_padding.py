"""What padding a layer's packets to its group's width costs: one SyncBatchNorm forward + backward.

Every synced packet of a group is as wide as the group's widest layer (``2C + 9`` floats; see
docs/semantics.md, 'When ranks diverge'), so that ranks at different layers meet in a collective that
completes. This times a layer of ``C`` channels with its packets at its own width against the same
layer padded to a ``--widest``-channel group (ResNet-50's widest layer has 2048), interleaved (see
``_timing.py``), on ``--world-size`` CPU ranks with gloo, float32, per-rank input ``(64, C, 4, 4)``.

    python benchmarks/bench_padding.py                # 2 ranks, about a minute
    python benchmarks/bench_padding.py --world-size 3 --iters 100
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from _launch import launch  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm import comm  # noqa: E402
from syncnorm.functional import HEAD  # noqa: E402


def _measure(rank, world_size, channels, widest, iters, warmup):
    rows = []
    for c in channels:
        layer = syncnorm.SyncBatchNorm(c)
        x = torch.randn(64, c, 4, 4, requires_grad=True)

        def step() -> None:
            layer(x).sum().backward()

        variants = {
            width: (lambda width=width: comm.set_packet_width(None, width), step)
            for width in (HEAD + 2 * c, HEAD + 2 * widest)
        }
        seconds = _timing.across_ranks(_timing.interleaved(variants, iters, warmup))
        own, padded = (_timing.summary(seconds[width])["median_ms"] for width in variants)
        rows.append((c, own, padded, padded - own))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--channels", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 256])
    parser.add_argument("--widest", type=int, default=2048, help="channels of the group's widest layer")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    rows = launch(_measure, args.world_size, args.channels, args.widest, args.iters, args.warmup)
    if rows is None:  # not rank 0 under torchrun
        return
    print(f"{args.world_size} ranks, gloo, CPU, float32; median of {args.iters} rounds (slowest rank), ms")
    print(f"{'C':>6} {'own width':>10} {f'padded to {args.widest}':>16} {'difference':>11}")
    for c, own, padded, difference in rows:
        print(f"{c:>6} {own:>10.3f} {padded:>16.3f} {difference:>+11.3f}")


if __name__ == "__main__":
    main()
