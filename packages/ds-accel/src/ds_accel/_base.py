"""The accelerator contract every backend implements.

An accelerator answers device questions (name, count, current device), gives streams and events
(no-ops where the device has none), memory statistics, pinned host memory, the communication
backend to use, and the flags kernel builds need. Packages talk to the device only through this
class, so a new device type is one subclass, not a change in every package.
"""

from __future__ import annotations

import abc
import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch


class Accelerator(abc.ABC):
    """Abstract accelerator. Subclasses set ``name`` and implement the abstract methods."""

    #: short type name used in ``DS_ACCELERATOR`` and ``torch.device`` ("cuda", "cpu", ...)
    name: str = ""

    # ----------------------------------------------------------------- identity and devices
    @abc.abstractmethod
    def is_available(self) -> bool:
        """True when this device type can be used in this process."""

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of devices of this type visible to this process."""

    @abc.abstractmethod
    def current_device(self) -> int:
        """Index of the device this process uses."""

    @abc.abstractmethod
    def set_device(self, index: int) -> None:
        """Make ``index`` the current device of this process."""

    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"`` or ``"cuda:1"``: the string ``torch.device`` takes."""
        if device_index is None:
            return self.name
        return f"{self.name}:{device_index}"

    def current_device_name(self) -> str:
        return self.device_name(self.current_device())

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device(self.device_name(device_index))

    def is_synchronized_device(self) -> bool:
        """True where kernels run synchronously with the host (CPU): streams are no-ops."""
        return False

    # ----------------------------------------------------------------- execution
    @abc.abstractmethod
    def synchronize(self, device_index: int | None = None) -> None:
        """Wait for every queued kernel of the device."""

    @abc.abstractmethod
    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        """Context manager that makes ``stream`` current (a no-op on synchronized devices)."""

    @abc.abstractmethod
    def Stream(self, device_index: int | None = None, priority: int = 0) -> Any:  # noqa: N802
        """A new stream (a no-op object on synchronized devices)."""

    @abc.abstractmethod
    def current_stream(self, device_index: int | None = None) -> Any: ...

    @abc.abstractmethod
    def default_stream(self, device_index: int | None = None) -> Any: ...

    @abc.abstractmethod
    def Event(self, enable_timing: bool = False) -> Any:  # noqa: N802
        """A new event (record/wait/synchronize/elapsed_time; host-timed where no device events)."""

    # ----------------------------------------------------------------- random numbers
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device_index: int | None = None) -> None:
        torch.set_rng_state(state)

    # ----------------------------------------------------------------- memory
    @abc.abstractmethod
    def memory_allocated(self, device_index: int | None = None) -> int: ...

    @abc.abstractmethod
    def max_memory_allocated(self, device_index: int | None = None) -> int: ...

    @abc.abstractmethod
    def memory_reserved(self, device_index: int | None = None) -> int: ...

    @abc.abstractmethod
    def reset_peak_memory_stats(self, device_index: int | None = None) -> None: ...

    @abc.abstractmethod
    def total_memory(self, device_index: int | None = None) -> int: ...

    def available_memory(self, device_index: int | None = None) -> int:
        return self.total_memory(device_index) - self.memory_reserved(device_index)

    def empty_cache(self) -> None:
        """Return cached blocks to the device (no-op where there is no caching allocator)."""

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        return {
            "allocated_bytes": self.memory_allocated(device_index),
            "max_allocated_bytes": self.max_memory_allocated(device_index),
            "reserved_bytes": self.memory_reserved(device_index),
            "total_bytes": self.total_memory(device_index),
        }

    # ----------------------------------------------------------------- host memory
    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked copy of ``tensor`` for fast async copies; the tensor itself where pinning
        has no meaning (no device to copy to)."""
        return tensor

    def pinned_empty(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor, page-locked where the device has such memory (its
        allocation exactly the size needed, rounded to pages: see ``CUDAAccelerator``); raises
        RuntimeError when the memory cannot be locked. Plain host memory where pinning has no
        meaning."""
        return torch.empty(shape, dtype=dtype)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False

    # ----------------------------------------------------------------- dtypes
    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        return True

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32]
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    # ----------------------------------------------------------------- communication
    @abc.abstractmethod
    def communication_backend_name(self) -> str:
        """torch.distributed backend for this device: "nccl", "gloo", ..."""

    def visible_devices_envs(self) -> list[str]:
        """Environment variables that restrict the devices a process sees (set by launchers)."""
        return []

    def set_visible_devices_envs(self, env: dict[str, str], local_ranks: list[int]) -> None:
        for var in self.visible_devices_envs():
            env[var] = ",".join(str(r) for r in local_ranks)

    # ----------------------------------------------------------------- profiling ranges
    def range_push(self, msg: str) -> None:
        """Open a named profiler range (NVTX on CUDA)."""

    def range_pop(self) -> None:
        """Close the innermost profiler range."""

    # ----------------------------------------------------------------- kernel builds
    def build_flags(self) -> dict[str, Any]:
        """Flags for compiling kernels for this device.

        Keys: ``cxx`` (host compiler flags), ``cuda`` (device compiler flags, empty without a
        device compiler), ``cuda_arch_list`` (e.g. ["9.0"]; empty where not applicable),
        ``cpu_isa`` (SIMD extensions the host CPU reports, e.g. ["avx2", "avx512f"]).
        """
        return {
            "cxx": ["-O3", "-std=c++17", "-fopenmp", *_cpu_arch_flags()],
            "cuda": [],
            "cuda_arch_list": [],
            "cpu_isa": cpu_isa(),
        }

    # ----------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        """Facts for ``ds-report``: what this accelerator is and what it can do."""
        available = self.is_available()
        return {
            "accelerator": self.name,
            "available": available,
            "device_count": self.device_count() if available else 0,
            "communication_backend": self.communication_backend_name(),
            "torch": torch.__version__,
            "supported_dtypes": [str(d).replace("torch.", "") for d in self.supported_dtypes()],
            "cpu_isa": cpu_isa(),
        }


def usable_cores() -> int:
    """Cores this process may run on (its affinity set: taskset, cpuset, a launcher's binding);
    the machine's core count where the platform has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_isa() -> list[str]:
    """SIMD extensions of the host CPU that matter for kernels (from /proc/cpuinfo on Linux)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return ["neon"]
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def _cpu_arch_flags() -> list[str]:
    # -march=native ties a build to this host's CPU; the ds-kernels cache key includes the ISA,
    # so a build is never reused on a CPU that lacks an extension it was compiled for.
    if os.environ.get("DS_BUILD_PORTABLE") == "1":
        return []
    return ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else []


class _HostEvent:
    """Event for synchronized devices: records host time, so elapsed_time still measures."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        """Nothing to wait for: work is finished when the host gets control back."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _HostEvent) -> float:
        """Milliseconds from this event to ``end`` (as ``torch.cuda.Event.elapsed_time``)."""
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time: record() both events before asking for the time")
        return (end._t - self._t) * 1000.0


class _HostStream:
    """Stream for synchronized devices: work submitted 'on' it has finished on return."""

    def __init__(self, device_index: int | None = None, priority: int = 0) -> None:
        self.device_index = device_index
        self.priority = priority

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        event = event or _HostEvent()
        event.record()
        return event

    def query(self) -> bool:
        return True


@contextlib.contextmanager
def _null_stream_context(stream: Any) -> Iterator[Any]:
    yield stream
