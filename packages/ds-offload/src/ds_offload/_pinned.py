"""Host buffers for IO and device copies: aligned for O_DIRECT, page-locked when asked.

Page-locking ("pinning") goes through the accelerator's pinned host allocator when it has a
device (CUDA: fast asynchronous host<->device copies), else through mlock(2) (no swapping of
optimizer state). Either can fail when the request exceeds what the system lets this process
lock (RLIMIT_MEMLOCK for mlock, the driver's pinned pool for CUDA): the buffer is then ordinary
pageable memory and one `OffloadWarning` says so, because training still works, only slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import warnings

import torch

from ds_offload._errors import OffloadWarning

DIRECT_ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to this


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mlock.restype = ctypes.c_int
    return lib


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes, None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _device_pinning() -> bool:
    from ds_accel import get_accelerator

    acc = get_accelerator()
    return acc.device_name() != "cpu" and acc.is_available()


def _warn_unpinned(nbytes: int, why: str) -> None:
    limit = memlock_limit()
    limit_s = "unlimited" if limit is None else f"{limit} bytes"
    warnings.warn(
        f"ds_offload: could not page-lock a {nbytes}-byte host buffer ({why}; RLIMIT_MEMLOCK is "
        f"{limit_s}); using pageable memory instead, host<->device copies will be slower. "
        "Raise the limit (ulimit -l / memlock in limits.conf / docker --ulimit memlock=-1) or "
        "set pin_memory: false to silence this.",
        OffloadWarning,
        stacklevel=3,
    )


def _raw(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A uint8 tensor of ``nbytes`` (+ alignment slack) and whether it is page-locked."""
    if pin and _device_pinning():
        from ds_accel import get_accelerator

        try:
            # exactly the bytes asked for (torch's own pinned allocator rounds each request up
            # to a power of two: up to half of the host memory offload exists to use)
            acc = get_accelerator()
            raw = acc.pinned_empty((nbytes,), torch.uint8)
            return raw, acc.is_pinned(raw)
        except RuntimeError as exc:  # the memory cannot be locked (limits, driver pool)
            _warn_unpinned(nbytes, f"pinned allocation failed: {str(exc).splitlines()[0]}")
            return torch.empty(nbytes, dtype=torch.uint8), False
    raw = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return raw, False
    libc = _libc()
    if libc.mlock(raw.data_ptr(), nbytes) != 0:
        err = ctypes.get_errno()
        _warn_unpinned(nbytes, f"mlock failed: {os.strerror(err)}")
        return raw, False
    # munlock is implicit when the memory is freed (the pages return to the allocator; a later
    # reuse of them stays locked, which is harmless) so no finaliser is needed.
    return raw, True


def aligned_empty(
    shape: int | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    pin: bool = False,
    align: int = DIRECT_ALIGN,
) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts on an ``align``-byte boundary and whose
    allocation is rounded up to a multiple of ``align`` (so O_DIRECT can cover it whole)."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"aligned_empty: align must be a power of two, got {align}")
    shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = 1
    for s in shape_t:
        numel *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    padded = -(-nbytes // align) * align
    raw, _ = _raw(padded + align, pin)
    start = (-raw.data_ptr()) % align
    return raw[start : start + nbytes].view(dtype).view(shape_t)


def is_aligned(tensor: torch.Tensor, align: int = DIRECT_ALIGN) -> bool:
    return tensor.data_ptr() % align == 0
