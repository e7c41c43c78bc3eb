"""Interleaved multi-rank timing: round-robin over variants, a barrier before every timed block.

``interleaved(variants, iters, warmup)`` runs on every rank of a process group. Each round runs every
variant once, in an order rotated by one each round (so no variant always follows the same other one,
whose allocator or cache state it would inherit), and times each with ``time.perf_counter`` between a
barrier and the end of the variant's call. ``across_ranks`` then turns the per-rank samples into the
per-round *maximum over ranks* -- the time the slowest rank spent, which is what a synchronized
training step waits for -- and ``summary`` gives median and quartiles in milliseconds.
"""

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

# name -> (prepare, run): prepare is untimed (e.g. drop old gradients), run is timed.
Variant = Tuple[Optional[Callable[[], None]], Callable[[], None]]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def interleaved(variants: Dict[str, Variant], iters: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each variant on this rank, ``iters`` rounds after ``warmup`` rounds."""
    names = list(variants)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(warmup + iters):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            prepare, run = variants[name]
            if prepare is not None:
                prepare()
            barrier()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples


def across_ranks(samples: Dict[str, List[float]]) -> Dict[str, List[float]]:
    """Per-round maximum over the ranks of the group (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return samples
    everyone: List[Optional[Dict[str, List[float]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, samples)
    return {name: [max(values) for values in zip(*(s[name] for s in everyone))] for name in samples}


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, 25th and 75th percentile in milliseconds, and the number of samples."""
    ms = [s * 1e3 for s in seconds]
    return {
        "median_ms": statistics.median(ms),
        "p25_ms": quantile(ms, 0.25),
        "p75_ms": quantile(ms, 0.75),
        "n": len(ms),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Dict[str, float]:
    """Median and quartiles of the per-round ratio (both measured in the same round)."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "p25": quantile(ratios, 0.25), "p75": quantile(ratios, 0.75)}
