"""The Apple MPS accelerator: one GPU that shares memory with the host."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ds_accel._base import Accelerator, _HostEvent, _HostStream, _null_stream_context


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


class MPSAccelerator(Accelerator):
    """Apple GPUs through torch.mps; torch exposes no streams for MPS, so streams are host
    no-ops and events time on the host after a synchronize."""

    name = "mps"

    def is_available(self) -> bool:
        return _mps_available()

    def device_count(self) -> int:
        return 1 if _mps_available() else 0

    def current_device(self) -> int:
        return 0

    def set_device(self, index: int) -> None:
        if index != 0:
            raise ValueError(f"set_device({index}): MPS has one device, index 0")

    def device_name(self, device_index: int | None = None) -> str:
        return "mps"

    def synchronize(self, device_index: int | None = None) -> None:
        if _mps_available():
            torch.mps.synchronize()

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

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        if _mps_available():
            torch.mps.manual_seed(seed)

    def memory_allocated(self, device_index: int | None = None) -> int:
        return torch.mps.current_allocated_memory() if _mps_available() else 0

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        # torch.mps keeps no peak counter; the driver's allocation is the honest upper figure.
        return torch.mps.driver_allocated_memory() if _mps_available() else 0

    def memory_reserved(self, device_index: int | None = None) -> int:
        return torch.mps.driver_allocated_memory() if _mps_available() else 0

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        pass

    def total_memory(self, device_index: int | None = None) -> int:
        if _mps_available() and hasattr(torch.mps, "recommended_max_memory"):
            return torch.mps.recommended_max_memory()
        return 0

    def empty_cache(self) -> None:
        if _mps_available():
            torch.mps.empty_cache()

    def is_bf16_supported(self) -> bool:
        return _mps_available()

    def communication_backend_name(self) -> str:
        return "gloo"
