"""The CUDA accelerator; also serves ROCm, which PyTorch exposes through the same ``cuda`` API."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ds_accel._base import Accelerator
from ds_accel._pinned_host import registered_empty


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


class CUDAAccelerator(Accelerator):
    """NVIDIA GPUs through torch.cuda (AMD GPUs through torch's HIP build)."""

    name = "cuda"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def set_device(self, index: int) -> None:
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise ValueError(
                f"set_device({index}): this process sees {count} CUDA device(s); check "
                "CUDA_VISIBLE_DEVICES and LOCAL_RANK (one process per device)"
            )
        torch.cuda.set_device(index)

    def synchronize(self, device_index: int | None = None) -> None:
        torch.cuda.synchronize(device_index)

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def Stream(self, device_index: int | None = None, priority: int = 0) -> Any:  # noqa: N802
        return torch.cuda.Stream(device=device_index, priority=priority)

    def current_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.current_stream(device_index)

    def default_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.default_stream(device_index)

    def Event(self, enable_timing: bool = False) -> Any:  # noqa: N802
        return torch.cuda.Event(enable_timing=enable_timing)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.cuda.get_rng_state("cuda" if device_index is None else device_index)

    def set_rng_state(self, state: torch.Tensor, device_index: int | None = None) -> None:
        torch.cuda.set_rng_state(state, "cuda" if device_index is None else device_index)

    def memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.max_memory_allocated(device_index)

    def memory_reserved(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_reserved(device_index)

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        torch.cuda.reset_peak_memory_stats(device_index)

    def total_memory(self, device_index: int | None = None) -> int:
        idx = self.current_device() if device_index is None else device_index
        return torch.cuda.get_device_properties(idx).total_memory

    def available_memory(self, device_index: int | None = None) -> int:
        free, _total = torch.cuda.mem_get_info(device_index)
        return free

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        stats = super().memory_stats(device_index)
        stats["num_alloc_retries"] = torch.cuda.memory_stats(device_index).get(
            "num_alloc_retries", 0
        )
        return stats

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.pinned_empty(tuple(tensor.shape), tensor.dtype)
        out.copy_(tensor)
        return out

    def pinned_empty(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for s in shape_t:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape_t, dtype=dtype, pin_memory=True)
        return registered_empty(nbytes).view(dtype).view(shape_t)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def communication_backend_name(self) -> str:
        # RCCL registers itself under the "nccl" name in torch's HIP build.
        return "nccl"

    def visible_devices_envs(self) -> list[str]:
        if _is_rocm():
            return ["HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"]
        return ["CUDA_VISIBLE_DEVICES"]

    def range_push(self, msg: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(msg)

    def range_pop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_pop()

    def build_flags(self) -> dict[str, Any]:
        flags = super().build_flags()
        arch: list[str] = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                cap = f"{major}.{minor}"
                if cap not in arch:
                    arch.append(cap)
        flags["cuda_arch_list"] = arch
        flags["cuda"] = ["-O3", "--use_fast_math", "-std=c++17"] if not _is_rocm() else ["-O3"]
        flags["rocm"] = _is_rocm()
        return flags

    def report(self) -> dict[str, Any]:
        rep = super().report()
        rep["rocm"] = _is_rocm()
        rep["cuda_version"] = torch.version.cuda
        rep["hip_version"] = getattr(torch.version, "hip", None)
        if self.is_available():
            rep["devices"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
        return rep
