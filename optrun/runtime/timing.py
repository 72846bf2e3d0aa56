"""Repeated timing with warm-up, on a monotonic clock, synchronising the device.

Every speed figure optrun reports (acceptance ranges, the speedup matrix, benchmarks) comes
from `measure`: median of `repeats` runs after `warmup` runs, with min and max kept so the
spread is visible.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from optrun.api.result import Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5) -> Timing:
    """Seconds per call of `fn`: median, min and max over `repeats` timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - started)
    return Timing(median=statistics.median(samples), min=min(samples), max=max(samples), repeats=repeats)


def ratio(baseline: Timing, candidate: Timing) -> Timing:
    """Speedup of candidate over baseline (baseline seconds / candidate seconds).

    The extremes pair the slowest baseline with the fastest candidate and vice versa, so the
    ratio's range covers what the repeats allow."""
    return Timing(
        median=baseline.median / candidate.median,
        min=baseline.min / candidate.max,
        max=baseline.max / candidate.min,
        repeats=min(baseline.repeats, candidate.repeats),
    )
