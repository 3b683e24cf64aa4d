"""CUDA-event timing shared by the GPU micro-benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_times_s(
    fn: Callable[[], object], warmup: int, iters: int, before: Callable[[], object] | None = None
) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls, each call timed
    alone between CUDA events on the current stream (synchronised after each, so queued work
    of one call never overlaps the next's timing). ``before`` runs untimed ahead of each call
    (e.g. a barrier, so that every rank starts a collective together)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def cuda_median_s(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median of :func:`cuda_times_s`."""
    return statistics.median(cuda_times_s(fn, warmup, iters))
