"""Page-locked host memory of exactly the size asked for, on CUDA.

torch's pinned allocator rounds every request up to a power of two (a 403 MB parameter shard
takes 512 MiB, an 805 MB optimizer state 1 GiB). For offload, whose point is to fit the most
state into host memory, that wastes up to half of it. Here anonymous memory is mapped with the
pages needed and registered with the CUDA driver (cudaHostRegister): the same page-locked
memory for asynchronous copies, without the rounding. It is unregistered when the last tensor
over it is freed (a tensor made by ``torch.frombuffer`` holds its buffer's exporter alive).
"""

from __future__ import annotations

import contextlib
import mmap
from typing import Any

import torch


class _RegisteredMap(mmap.mmap):
    ptr: int = 0
    cudart: Any = None

    def __del__(self) -> None:
        if self.ptr and self.cudart is not None:
            with contextlib.suppress(Exception):  # interpreter teardown: the driver may be gone
                self.cudart.cudaHostUnregister(self.ptr)
            self.ptr = 0


def registered_empty(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 host tensor of ``nbytes``, page-locked through cudaHostRegister;
    falls back to torch's pinned allocator where the runtime lacks it. Raises RuntimeError
    when neither can lock the memory (the caller decides whether pageable memory will do)."""
    try:
        cudart = torch.cuda.cudart()
        register = cudart.cudaHostRegister
    except (AttributeError, RuntimeError, AssertionError):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    size = max(mmap.PAGESIZE, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    region = _RegisteredMap(-1, size)
    raw = torch.frombuffer(region, dtype=torch.uint8)[:nbytes]
    rc = int(register(raw.data_ptr(), size, 0))
    if rc != 0:
        del raw, region
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cudaHostRegister of {nbytes} bytes failed (error {rc}) and so did the pinned "
                f"allocator: {str(exc).splitlines()[0]}"
            ) from None
    region.ptr, region.cudart = raw.data_ptr(), cudart
    return raw
