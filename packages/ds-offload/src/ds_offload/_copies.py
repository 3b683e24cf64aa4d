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
        if not self.is_cpu:
            from ds_accel import get_accelerator

            acc = get_accelerator()
            self._acc = acc
            self.d2h = acc.Stream(device.index)
            self.h2d = acc.Stream(device.index)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Start ``dst.copy_(src)`` after the work already queued on the current stream (which
        produced ``src``); returns an event to wait on (None on CPU: the copy is done)."""
        if self.is_cpu:
            dst.copy_(src)
            return None
        self.d2h.wait_stream(self._acc.current_stream(self.device.index))
        with self._acc.stream(self.d2h):
            dst.copy_(src, non_blocking=True)
            src.record_stream(self.d2h)
            event = self._acc.Event()
            event.record(self.d2h)
        return event

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.is_cpu:
            dst.copy_(src)
            return
        with self._acc.stream(self.h2d):
            dst.copy_(src, non_blocking=True)

    @staticmethod
    def wait(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def finish(self) -> None:
        """Make the current stream wait for every host-to-device copy, and the host wait for
        them too (their pinned sources are overwritten at the next step)."""
        if self.is_cpu:
            return
        self._acc.current_stream(self.device.index).wait_stream(self.h2d)
        self.h2d.synchronize()
