"""Host<->device copies on side streams, so that transfers overlap the CPU optimizer and the
device's own work. On a CPU-only machine every call degenerates to a plain copy."""

from __future__ import annotations

from typing import Any

import torch


class Copier:
    """Two side streams (device-to-host, host-to-device) of the device the partitions live on."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cpu = device.type == "cpu"
        self.d2h: Any = None
        self.h2d: Any = None
        # when a list: each copy appends ("d2h"|"h2d", bytes, start event, end event), timed on
        # its own stream (benchmarks' transfer rates); None (default) adds no events
        self.log: list[tuple[str, int, Any, Any]] | None = None
        if not self.is_cpu:
            from ds_accel import get_accelerator

            acc = get_accelerator()
            self._acc = acc
            self.d2h = acc.Stream(device.index)
            self.h2d = acc.Stream(device.index)

    def record(self) -> Any:
        """An event after the work queued so far on the current stream (None on CPU)."""
        if self.is_cpu:
            return None
        event = self._acc.Event()
        event.record(self._acc.current_stream(self.device.index))
        return event

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Any:
        """Start ``dst.copy_(src)`` after ``after`` (an event from ``record``), or by default
        after the work already queued on the current stream (which produced ``src``); returns
        an event to wait on (None on CPU: the copy is done). A worker thread passes ``after``:
        its own current stream is not the one that produced ``src``, and the caller's stream
        may by then hold the next forward, which the copy must not wait for."""
        if self.is_cpu:
            dst.copy_(src)
            return None
        if after is not None:
            self.d2h.wait_event(after)
        else:
            self.d2h.wait_stream(self._acc.current_stream(self.device.index))
        with self._acc.stream(self.d2h):
            start = self._timed_start()
            dst.copy_(src, non_blocking=True)
            self._timed_end("d2h", src, start)
            src.record_stream(self.d2h)
            event = self._acc.Event()
            event.record(self.d2h)
        return event

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Queue ``dst.copy_(src)`` on the host-to-device stream; returns an event after it
        (None on CPU: the copy is done)."""
        if self.is_cpu:
            dst.copy_(src)
            return None
        with self._acc.stream(self.h2d):
            start = self._timed_start()
            dst.copy_(src, non_blocking=True)
            self._timed_end("h2d", src, start)
            event = self._acc.Event()
            event.record(self.h2d)
        return event

    def _timed_start(self) -> Any:
        if self.log is None:
            return None
        start = self._acc.Event(enable_timing=True)
        start.record()
        return start

    def _timed_end(self, kind: str, src: torch.Tensor, start: Any) -> None:
        if start is None or self.log is None:
            return
        end = self._acc.Event(enable_timing=True)
        end.record()
        self.log.append((kind, src.numel() * src.element_size(), start, end))

    def stream_waits(self, event: Any) -> None:
        """The calling thread's current stream waits for ``event`` (no host wait)."""
        if event is not None:
            self._acc.current_stream(self.device.index).wait_event(event)

    def h2d_done(self) -> None:
        """The host waits for every queued host-to-device copy (their sources may be reused)."""
        if not self.is_cpu:
            self.h2d.synchronize()

    def set_thread_device(self) -> None:
        """Make this device current in the calling thread (CUDA's current device is per
        thread): a worker thread's copies and events then go to the right device."""
        if not self.is_cpu and self.device.index is not None:
            self._acc.set_device(self.device.index)

    @staticmethod
    def wait(event: Any) -> None:
        if event is not None:
            event.synchronize()
