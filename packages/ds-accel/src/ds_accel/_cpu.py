"""The CPU accelerator: the host is the device; streams and events are host no-ops."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ds_accel._base import Accelerator, _HostEvent, _HostStream, _null_stream_context


def _total_host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _rss_bytes() -> int:
    # Resident set size of this process: the closest CPU analogue to "memory allocated".
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CPUAccelerator(Accelerator):
    """One logical device, ``cpu``; collective communication over gloo."""

    name = "cpu"

    def __init__(self) -> None:
        self._peak_rss: int = 0

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        # One logical device: several CPU ranks on a host share it, as DDP on CPU does.
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, index: int) -> None:
        if index != 0:
            raise ValueError(
                f"set_device({index}): the cpu accelerator has one device, index 0; "
                "run one process per rank rather than one device per rank on CPU"
            )

    def device_name(self, device_index: int | None = None) -> str:
        # torch has no "cpu:1"; every CPU rank uses the same device string.
        return "cpu"

    def is_synchronized_device(self) -> bool:
        return True

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return _null_stream_context(stream)

    def Stream(self, device_index: int | None = None, priority: int = 0) -> Any:  # noqa: N802
        return _HostStream(device_index, priority)

    def current_stream(self, device_index: int | None = None) -> Any:
        return _HostStream(device_index)

    def default_stream(self, device_index: int | None = None) -> Any:
        return _HostStream(device_index)

    def Event(self, enable_timing: bool = False) -> Any:  # noqa: N802
        return _HostEvent(enable_timing)

    def memory_allocated(self, device_index: int | None = None) -> int:
        rss = _rss_bytes()
        self._peak_rss = max(self._peak_rss, rss)
        return rss

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return max(self._peak_rss, self.memory_allocated())

    def memory_reserved(self, device_index: int | None = None) -> int:
        return self.memory_allocated()

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        self._peak_rss = _rss_bytes()

    def total_memory(self, device_index: int | None = None) -> int:
        return _total_host_memory()

    def available_memory(self, device_index: int | None = None) -> int:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return max(0, self.total_memory() - self.memory_allocated())

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        # fp16 math on CPU is emulated and slow, but correct; mixed-precision tests rely on it.
        return True

    def communication_backend_name(self) -> str:
        return "gloo"

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False
