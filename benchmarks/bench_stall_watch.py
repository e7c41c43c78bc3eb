"""What the deadlock watch costs: one SyncBatchNorm forward + backward with and without it.

A synced CPU collective waits with a timeout (``syncnorm.comm.STALL_SECONDS``, 2 s) so that ranks stuck in
collectives of different groups can raise (docs/semantics.md, 'When ranks diverge'). This times a layer of
``C`` channels with the watch on (the default) and off (``STALL_SECONDS = None``: a plain wait),
interleaved (see ``_timing.py``), on ``--world-size`` CPU ranks with gloo, float32, per-rank input
``(64, C, 4, 4)``; then one wait that outlasts the timeout (a rank that sleeps), with and without the watch,
for what posting to and polling the store adds to a long wait.

    python benchmarks/bench_stall_watch.py                # 2 ranks, about a minute
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from _launch import launch  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm import comm  # noqa: E402


def _set_watch(seconds):
    def prepare() -> None:
        comm.STALL_SECONDS = seconds
    return prepare


def _measure(rank, world_size, channels, iters, warmup, sleep):
    rows = []
    for c in channels:
        layer = syncnorm.SyncBatchNorm(c)
        x = torch.randn(64, c, 4, 4, requires_grad=True)

        def step() -> None:
            layer(x).sum().backward()

        variants = {"watch on": (_set_watch(2.0), step), "watch off": (_set_watch(None), step)}
        seconds = _timing.across_ranks(_timing.interleaved(variants, iters, warmup))
        on, off = (_timing.summary(seconds[name])["median_ms"] for name in variants)
        rows.append((f"C = {c}", off, on))
    # A long wait: rank 1 arrives `sleep` seconds late; rank 0's wait (past STALL_SECONDS) is timed.
    layer, x = syncnorm.SyncBatchNorm(16), torch.randn(64, 16, 4, 4)
    waits = {}
    for name, seconds in (("watch off", None), ("watch on", 0.5)):
        comm.STALL_SECONDS = seconds
        _timing.barrier()
        if rank == 1:
            time.sleep(sleep)
        start = time.perf_counter()
        layer(x)
        waits[name] = (time.perf_counter() - start) * 1000
    rows.append((f"a {sleep:g} s wait, rank 0", waits["watch off"], waits["watch on"]))
    comm.STALL_SECONDS = 2.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--channels", type=lambda s: [int(v) for v in s.split(",")], default=[16, 256])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds the late rank sleeps")
    args = parser.parse_args()
    rows = launch(_measure, args.world_size, args.channels, args.iters, args.warmup, args.sleep)
    if rows is None:  # not rank 0 under torchrun
        return
    print(f"{args.world_size} ranks, gloo, CPU, float32; forward + backward, median of {args.iters} rounds "
          "(slowest rank), ms; the long wait is one call on rank 0 with the watch polling after 0.5 s")
    print(f"{'case':>22} {'watch off':>10} {'watch on':>10} {'difference':>11}")
    for case, off, on in rows:
        print(f"{case:>22} {off:>10.3f} {on:>10.3f} {on - off:>+11.3f}")


if __name__ == "__main__":
    main()
