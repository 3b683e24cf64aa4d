"""``deepspeed.utils.timer``: named phase timers (``SynchronizedWallClockTimer``), their no-op
stand-in, the samples/s ``ThroughputTimer``, and DeepSpeed's timer names.

Phases are timed with the accelerator's events (``ds_accel``): device events on GPUs, so
timing does not stall the stream until a time is read; host clocks where the device has no
events (CPU), where the work has finished when the host regains control anyway.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from ds_accel import get_accelerator
from ds_all.utils.logging import _rank

FORWARD_MICRO_TIMER = "fwd_microstep"
FORWARD_GLOBAL_TIMER = "fwd"
BACKWARD_MICRO_TIMER = "bwd_microstep"
BACKWARD_GLOBAL_TIMER = "bwd"
BACKWARD_INNER_MICRO_TIMER = "bwd_inner_microstep"
BACKWARD_INNER_GLOBAL_TIMER = "bwd_inner"
BACKWARD_REDUCE_MICRO_TIMER = "bwd_allreduce_microstep"
BACKWARD_REDUCE_GLOBAL_TIMER = "bwd_allreduce"
STEP_MICRO_TIMER = "step_microstep"
STEP_GLOBAL_TIMER = "step"
TIME_EPSILON = 1e-6


def trim_mean(data: Iterable[float], trim_percent: float) -> float:
    """Mean of ``data`` without its ``trim_percent`` smallest and largest values (0 if empty)."""
    if not 0.0 <= trim_percent <= 1.0:
        raise ValueError(f"trim_percent must be in [0, 1], got {trim_percent}")
    values = sorted(data)
    n = len(values)
    if n == 0:
        return 0
    k = int(round(n * trim_percent))
    return statistics.fmean(values[k : n - k])


class _Timer:
    """One named timer: start/stop intervals, summed in milliseconds by ``elapsed``."""

    def __init__(self, name: str) -> None:
        self.name_ = name
        self.started_ = False
        self.start_event: Any = None
        self.event_timers: list[tuple[Any, Any]] = []
        self.elapsed_records: list[float] | None = None

    def start(self) -> None:
        if self.started_:
            raise RuntimeError(f"{self.name_} timer has already been started")
        self.start_event = get_accelerator().Event(enable_timing=True)
        self.start_event.record()
        self.started_ = True

    def stop(self, reset: bool = False, record: bool = False) -> None:
        del reset, record  # DeepSpeed's signature; neither changes what is recorded
        if not self.started_:
            raise RuntimeError(f"{self.name_} timer is not started")
        end = get_accelerator().Event(enable_timing=True)
        end.record()
        self.event_timers.append((self.start_event, end))
        self.start_event = None
        self.started_ = False

    def _get_elapsed_msec(self) -> float:
        records = []
        for start, end in self.event_timers:
            end.synchronize()
            records.append(start.elapsed_time(end))
        self.elapsed_records = records
        return sum(records)

    def reset(self) -> None:
        self.started_ = False
        self.start_event = None
        self.elapsed_records = None
        self.event_timers.clear()

    def elapsed(self, reset: bool = True) -> float:
        """Milliseconds over the recorded intervals (a running interval is closed and
        reopened); ``reset`` clears them."""
        running = self.started_
        if running:
            self.stop()
        total = self._get_elapsed_msec()
        if reset:
            self.reset()
        if running:
            self.start()
        return total

    def mean(self) -> float:
        """Trimmed mean (10%) of the recorded intervals, in milliseconds."""
        self.elapsed(reset=False)
        return trim_mean(self.elapsed_records or [], 0.1)


class SynchronizedWallClockTimer:
    """A group of named timers: ``timers("fwd").start()`` ... ``timers.log(["fwd"])``."""

    Timer = _Timer

    def __init__(self) -> None:
        self.timers: dict[str, _Timer] = {}

    def get_timers(self) -> dict[str, _Timer]:
        return self.timers

    def __call__(self, name: str) -> _Timer:
        if name not in self.timers:
            self.timers[name] = self.Timer(name)
        return self.timers[name]

    @staticmethod
    def memory_usage() -> str:
        acc, gb = get_accelerator(), 1024**3
        return (
            f" | mem_allocated: {acc.memory_allocated() / gb:.4f} GB"
            f" | max_mem_allocated: {acc.max_memory_allocated() / gb:.4f} GB"
            f" | cache_allocated: {acc.memory_reserved() / gb:.4f} GB"
        )

    def log(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True,
            memory_breakdown: bool = False, ranks: list[int] | None = None) -> None:  # fmt: skip
        """Print ``time (ms) | name: t | ...`` for the named timers on ``ranks`` (default 0),
        whatever the log level (DeepSpeed prints it too)."""
        if normalizer <= 0.0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        line = "time (ms)"
        for name in names:
            if name in self.timers:
                line += f" | {name}: {self.timers[name].elapsed(reset=reset) / normalizer:.2f}"
        if memory_breakdown:
            line += self.memory_usage()
        wanted = ranks or [0]
        if -1 in wanted or _rank() in wanted:
            print(f"[Rank {_rank()}] {line}", flush=True)

    def get_mean(self, names: Iterable[str], normalizer: float = 1.0,
                 reset: bool = True) -> dict[str, float]:  # fmt: skip
        """name -> trimmed mean interval x 1000 / normalizer, for the named timers that exist
        (DeepSpeed's scale, kept so that numbers compare: the mean itself is in ms)."""
        del reset
        if normalizer <= 0.0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return {n: self.timers[n].mean() * 1000.0 / normalizer for n in names if n in self.timers}


class _NoopTimerEntry:
    def start(self) -> None: ...

    def reset(self) -> None: ...

    def stop(self, **kwargs: Any) -> None: ...

    def elapsed(self, **kwargs: Any) -> float:
        return 0

    def mean(self) -> float:
        return 0


class NoopTimer:
    """Same calls as ``SynchronizedWallClockTimer``, measuring nothing (timing disabled)."""

    Timer = _NoopTimerEntry

    def __init__(self) -> None:
        self.timer = self.Timer()

    def __call__(self, name: str) -> _NoopTimerEntry:
        return self.timer

    def get_timers(self) -> dict[str, Any]:
        return {}

    def log(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True,
            memory_breakdown: bool = False, ranks: list[int] | None = None) -> None: ...  # fmt: skip

    def get_mean(self, names: Iterable[str], normalizer: float = 1.0,
                 reset: bool = True) -> None: ...  # fmt: skip


class ThroughputTimer:
    """Samples per second over the steps after ``start_step``. ``config`` has ``enabled`` and
    ``synchronized`` (DeepSpeed's ``timers.throughput`` section); ``start()`` / ``stop()``
    bracket each micro-step, ``stop(global_step=True)`` ends an optimizer step and, every
    ``steps_per_output`` steps, logs the rates through ``logging_fn``."""

    def __init__(self, config: Any, batch_size: int | None, start_step: int = 2,
                 steps_per_output: int | None = None, monitor_memory: bool = False,
                 logging_fn: Callable[[str], Any] | None = None) -> None:  # fmt: skip
        from ds_all.utils.logging import logger

        self.config = config
        self.batch_size = 1 if batch_size is None else batch_size
        self.start_step = start_step
        self.steps_per_output = steps_per_output
        self.monitor_memory = monitor_memory
        self.logging = logging_fn or logger.info
        self.start_time = 0.0
        self.end_time = 0.0
        self.started = False
        self.initialized = False
        self.epoch_count = 0
        self.micro_step_count = 0
        self.global_step_count = 0
        self.total_elapsed_time = 0.0
        self.step_elapsed_time = 0.0
        if monitor_memory:
            import psutil  # noqa: F401 - DeepSpeed's requirement for monitor_memory

    def update_epoch_count(self) -> None:
        self.epoch_count += 1
        self.micro_step_count = 0

    def start(self) -> None:
        if not self.config.enabled:
            return
        self.initialized = True
        self.started = True
        if self.global_step_count >= self.start_step:
            if self.config.synchronized:
                get_accelerator().synchronize()
            self.start_time = time.time()

    def stop(self, global_step: bool = False, report_speed: bool = True) -> None:
        if not self.config.enabled or not self.started:
            return
        self.started = False
        self.micro_step_count += 1
        if global_step:
            self.global_step_count += 1
        if self.start_time <= 0:
            return
        if self.config.synchronized:
            get_accelerator().synchronize()
        self.end_time = time.time()
        duration = self.end_time - self.start_time
        self.total_elapsed_time += duration
        self.step_elapsed_time += duration
        if not global_step:
            return
        if (
            report_speed
            and self.steps_per_output
            and not self.global_step_count % self.steps_per_output
        ):
            acc = get_accelerator()
            self.logging(
                f"epoch={self.epoch_count}/micro_step={self.micro_step_count}/"
                f"global_step={self.global_step_count}, "
                f"RunningAvgSamplesPerSec={self.avg_samples_per_sec()}, "
                f"CurrSamplesPerSec={self.batch_size / (self.step_elapsed_time + TIME_EPSILON)}, "
                f"MemAllocated={round(acc.memory_allocated() / 1024**3, 2)}GB, "
                f"MaxMemAllocated={round(acc.max_memory_allocated() / 1024**3, 2)}GB"
            )
            if self.monitor_memory:
                import psutil

                self.logging(
                    f"epoch={self.epoch_count}/micro_step={self.micro_step_count}/"
                    f"global_step={self.global_step_count}, "
                    f"vm %: {psutil.virtual_memory().percent}, swap %: {psutil.swap_memory().percent}"
                )
        self.step_elapsed_time = 0

    def avg_samples_per_sec(self) -> float:
        """Samples/s averaged over the timed steps (``-inf`` until one was timed)."""
        timed_steps = self.global_step_count - self.start_step
        if self.global_step_count > 0 and timed_steps > 0 and self.total_elapsed_time > 0:
            return self.batch_size / (self.total_elapsed_time / timed_steps)
        return float("-inf")


__all__ = [
    "BACKWARD_GLOBAL_TIMER",
    "BACKWARD_INNER_GLOBAL_TIMER",
    "BACKWARD_INNER_MICRO_TIMER",
    "BACKWARD_MICRO_TIMER",
    "BACKWARD_REDUCE_GLOBAL_TIMER",
    "BACKWARD_REDUCE_MICRO_TIMER",
    "FORWARD_GLOBAL_TIMER",
    "FORWARD_MICRO_TIMER",
    "STEP_GLOBAL_TIMER",
    "STEP_MICRO_TIMER",
    "TIME_EPSILON",
    "NoopTimer",
    "SynchronizedWallClockTimer",
    "ThroughputTimer",
    "trim_mean",
]
