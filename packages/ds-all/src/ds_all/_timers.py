"""Wall-clock breakdown of forward, backward and step (``wall_clock_breakdown``)."""

from __future__ import annotations

import time
from collections import defaultdict

from ds_accel import get_accelerator


class Timers:
    """Accumulates elapsed milliseconds per phase; synchronizes the device around each phase
    only when enabled (timing forces the sync, so it is off by default)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}

    def start(self, name: str) -> None:
        if self.enabled:
            get_accelerator().synchronize()
            self._start[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        if self.enabled and name in self._start:
            get_accelerator().synchronize()
            self.totals[name] += (time.perf_counter() - self._start.pop(name)) * 1000.0
            self.counts[name] += 1

    def summary(self) -> str:
        parts = [
            f"{n}: {self.totals[n] / max(1, self.counts[n]):.2f} ms"
            for n in ("forward", "backward", "step")
            if self.counts[n]
        ]
        return "time (avg per micro-step) | " + " | ".join(parts)

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
