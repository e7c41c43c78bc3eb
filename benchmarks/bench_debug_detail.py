"""What TORCH_DISTRIBUTED_DEBUG=DETAIL costs a synced training step (docs/troubleshooting.md, 'A hang').

DETAIL wraps the process group in torch's ProcessGroupWrapper, which before every collective compares the
ranks' collective kinds and shapes over a helper gloo group: one more small exchange per collective. Each
run here joins a fresh group of 2 CPU ranks (gloo, float32, one thread per rank) with the variable set
("DETAIL") or not ("off") before init_process_group, as a user's script would, and times ``--steps`` steps
(a barrier before each, the slowest rank's time); runs alternate off, DETAIL, off, ... ``--pairs`` times,
and the medians over all steps of each level are printed. Two cases:

* ``lenet``: one training step (forward, backward, SGD) of the launcher's LeNet with syncbn, per-rank
  batch 64 of 1x28x28 (the documented run's step), its gradients averaged by one all_reduce (what DDP's one
  bucket does for this model: DDP itself cannot be built over a DETAIL gloo group on torch 2.14);
* ``layer``: forward + backward of one ``SyncBatchNorm2d`` on (64, 16, 12, 12) per rank (no DDP).

    python benchmarks/bench_debug_detail.py            # ~1 minute on 2 cores
"""

import argparse
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from _launch import LaunchError, launch  # noqa: E402

import syncnorm  # noqa: E402
from syncnorm.train.models import build_model  # noqa: E402


def _lenet_step():
    torch.manual_seed(0)
    model = build_model("lenet", norm="syncbn")
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        # DDP's part, by hand: DDP over gloo cannot be built under DETAIL on torch 2.14 (SIGSEGV in its
        # constructor, docs/troubleshooting.md); one all_reduce of every gradient, as DDP's one bucket here
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()
    return None, step


def _layer_step():
    layer = syncnorm.SyncBatchNorm(16)
    x = torch.randn(64, 16, 12, 12, requires_grad=True)

    def step():
        layer(x).sum().backward()
    return (lambda: setattr(x, "grad", None)), step


def body(rank, world_size, level, store_path, steps, warmup):
    dist.destroy_process_group()  # the launcher's group; join one with this level set before the init
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = level
    dist.set_debug_level_from_env()  # what importing torch.distributed does with the variable set
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    seconds = {}
    for case, make in (("lenet", _lenet_step), ("layer", _layer_step)):
        prepare, step = make()
        samples = _timing.interleaved({case: (prepare, step)}, steps, warmup)
        seconds.update(_timing.across_ranks(samples))
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run and case (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--pairs", type=int, default=3, help="off/DETAIL run pairs, alternating (default 3)")
    args = parser.parse_args()
    seconds = {(level, case): [] for level in ("OFF", "DETAIL") for case in ("lenet", "layer")}
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(2 * args.pairs):
            level = ("OFF", "DETAIL")[run % 2]
            for attempt in range(3):
                try:
                    result = launch(body, 2, level, os.path.join(scratch, f"store{run}.{attempt}"), args.steps,
                                    args.warmup)
                    break
                except LaunchError as failure:  # seen on a loaded machine: gloo's connect at the start failed
                    print(f"run {run + 1} ({level}) failed, again: {str(failure).splitlines()[-1]}", file=sys.stderr)
            else:
                raise SystemExit(f"run {run + 1} ({level}) failed 3 times")
            for case, values in result.items():
                seconds[level, case] += values
    print(f"2 gloo ranks, 1 thread each, torch {torch.__version__}; median step time of the slowest rank "
          f"({args.pairs} runs x {args.steps} steps per level), quartiles in brackets:")
    for case in ("lenet", "layer"):
        off, detail = (_timing.summary(seconds[level, case]) for level in ("OFF", "DETAIL"))
        print(f"{case:6s} off {off['median_ms']:6.2f} ms [{off['p25_ms']:.2f}-{off['p75_ms']:.2f}]  "
              f"DETAIL {detail['median_ms']:6.2f} ms [{detail['p25_ms']:.2f}-{detail['p75_ms']:.2f}]  "
              f"+{detail['median_ms'] - off['median_ms']:.2f} ms ({detail['median_ms'] / off['median_ms']:.2f}x)")


if __name__ == "__main__":
    main()
