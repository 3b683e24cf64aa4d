"""CUDA-event timing shared by the GPU micro-benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_median_s(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` calls after ``warmup`` calls, each call timed
    alone between CUDA events on the current stream (synchronised after each, so queued work
    of one call never overlaps the next's timing)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
