"""Runtime options: plain frozen dataclasses, so ds_offload runs where pydantic is absent (the
pydantic config models of ``_config`` convert DeepSpeed JSON sections into these)."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any


class OffloadDevice(str, enum.Enum):
    """Where offloaded tensors live. ``none`` disables offload."""

    none = "none"
    cpu = "cpu"
    nvme = "nvme"


def _positive(where: str, name: str, value: Any, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        raise ValueError(
            f"{where}.{name} must be an integer {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )


AUTO = "auto"


def drop_auto(data: dict[str, Any], kept: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``data`` without its "auto" values (keys outside ``kept``): in DeepSpeed's pydantic
    offload sections "auto" means the key's default (HF's integration writes it)."""
    return {k: v for k, v in data.items() if k in kept or not (isinstance(v, str) and v == AUTO)}


# offload_optimizer keys whose "auto" is a value of its own (ds_offload extension), not a default
OPTIMIZER_AUTO_KEYS = frozenset({"ratio"})


@dataclasses.dataclass(frozen=True)
class AioOptions:
    block_size: int = 1_048_576
    queue_depth: int = 8
    thread_count: int = 1
    single_submit: bool = False
    overlap_events: bool = True
    use_direct: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "queue_depth", "thread_count"):
            _positive("aio", name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class _OffloadOptions:
    device: OffloadDevice = OffloadDevice.none
    nvme_path: Path | None = None
    # DeepSpeed 0.19.8's default: page-locked host buffers (a no-op without a device)
    pin_memory: bool = True

    def _check(self, where: str) -> None:
        try:
            object.__setattr__(self, "device", OffloadDevice(self.device))
        except ValueError:
            raise ValueError(
                f"{where}.device must be 'none', 'cpu' or 'nvme', got {self.device!r}"
            ) from None
        if self.nvme_path is not None:
            object.__setattr__(self, "nvme_path", Path(self.nvme_path))
        if self.device is OffloadDevice.nvme and self.nvme_path is None:
            raise ValueError(
                f"{where}: device is 'nvme' but nvme_path is not set; set nvme_path to a directory "
                "on the NVMe drive (e.g. /local_nvme)"
            )

    @property
    def enabled(self) -> bool:
        return self.device is not OffloadDevice.none


@dataclasses.dataclass(frozen=True)
class OffloadOptimizerOptions(_OffloadOptions):
    buffer_count: int = 4
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    # DeepSpeed's: the fraction of the optimizer state offloaded (the last part of the model in
    # parameter order; the rest is stepped on the device). "auto" (ds_offload extension): chosen
    # from the device memory free at setup
    ratio: float | str = 1.0
    # ds_offload extension (DeepSpeed has no such key): with device nvme, the first partitions
    # totalling at most this many elements keep their state in CPU memory, the rest are swapped
    max_in_cpu: int = 0
    # ds_offload extension: CPU optimizer threads of this process (0: its share of the cores,
    # see ds_offload.cpu_optimizer_threads). DeepSpeed takes OpenMP's default.
    num_threads: int = 0
    # ds_offload extension: the CPU updates run on a worker thread and the next forward starts
    # on each partition as soon as it is updated (same math); False: step() returns when done
    overlap: bool = True
    # ds_offload extension: one-step-delayed parameter update (ZeRO-Offload's DPU): step N's
    # CPU update runs during step N+1's forward/backward, which use the parameters before it
    delayed_update: bool = False
    # ds_offload extension: host gradient buffers in the bf16/fp16 compute dtype for the
    # partitions whose caller can hand the gradient over exactly in it (2 bytes per parameter
    # to copy and read instead of 4, same update bits); False: fp32 buffers for every partition
    exact_16bit_grads: bool = True
    # DeepSpeed's SuperOffload switch and the share of the cores its CPU Adam uses; here it
    # selects the overlapped exact step (the default) and, unless num_threads is set, that
    # share of this process's cores for CPU Adam
    super_offload: bool = False
    cpuadam_cores_perc: float = 0.8

    def __post_init__(self) -> None:
        where = "zero_optimization.offload_optimizer"
        self._check(where)
        _positive(where, "buffer_count", self.buffer_count, allow_zero=True)
        _positive(where, "max_in_cpu", self.max_in_cpu, allow_zero=True)
        _positive(where, "num_threads", self.num_threads, allow_zero=True)
        if self.ratio != "auto" and (
            isinstance(self.ratio, (str, bool)) or not 0.0 <= float(self.ratio) <= 1.0
        ):
            raise ValueError(f'{where}.ratio must be in [0, 1] or "auto", got {self.ratio!r}')
        if not 0.0 <= float(self.cpuadam_cores_perc) <= 1.0:
            raise ValueError(
                f"{where}.cpuadam_cores_perc must be in [0, 1], got {self.cpuadam_cores_perc!r}"
            )
        if self.delayed_update and self.device is not OffloadDevice.cpu:
            raise ValueError(
                f"{where}.delayed_update needs device 'cpu' (got {self.device.value!r}): the "
                "delayed update keeps a second low-precision copy of the parameters in host "
                "memory, which NVMe offload exists to avoid; set device to 'cpu' or remove "
                "delayed_update"
            )
        if self.max_in_cpu and self.device is not OffloadDevice.nvme:
            raise ValueError(
                f"{where}.max_in_cpu splits optimizer state between CPU memory and NVMe; it needs "
                f"device 'nvme' (got {self.device.value!r}): set device to 'nvme' with an "
                "nvme_path, or remove max_in_cpu"
            )


@dataclasses.dataclass(frozen=True)
class OffloadParamOptions(_OffloadOptions):
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000

    def __post_init__(self) -> None:
        where = "zero_optimization.offload_param"
        self._check(where)
        # DeepSpeed accepts 0 for both (>= 0); they matter only with device nvme
        _positive(where, "buffer_count", self.buffer_count, allow_zero=True)
        _positive(where, "buffer_size", self.buffer_size, allow_zero=True)
        _positive(where, "max_in_cpu", self.max_in_cpu, allow_zero=True)
        if self.device is OffloadDevice.nvme and self.buffer_count == 0:
            raise ValueError(
                f"{where}.buffer_count is 0 with device 'nvme': parameters swapped in from NVMe "
                "need host buffers; set buffer_count to at least 1 (default 5)"
            )
