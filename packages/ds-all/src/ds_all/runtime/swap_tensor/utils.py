"""``deepspeed.runtime.swap_tensor.utils``: submit the reads or writes of a list of tensors on
an async IO handle (``AsyncIOBuilder().load().aio_handle``, or ``ds_offload.AsyncIO``); the
caller then ``wait()``s. DeepSpeed's swap-buffer classes are not here (see the package)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

MIN_AIO_BYTES = 1024**2
AIO_ALIGNED_BYTES = 1024
MIN_SWAPPABLE_BYTES = MIN_AIO_BYTES


def swap_in_tensors(swap_handle: Any, tensor_buffers: Iterable[torch.Tensor],
                    swap_paths: Iterable[str]) -> None:  # fmt: skip
    """Start reading each buffer from its file."""
    for buffer, path in zip(tensor_buffers, swap_paths, strict=True):
        swap_handle.async_pread(buffer, path, 0)


def swap_out_tensors(swap_handle: Any, tensor_buffers: Iterable[torch.Tensor],
                     swap_paths: Iterable[str]) -> None:  # fmt: skip
    """Start writing each buffer to its file."""
    for buffer, path in zip(tensor_buffers, swap_paths, strict=True):
        swap_handle.async_pwrite(buffer, path, 0)


__all__ = [
    "AIO_ALIGNED_BYTES",
    "MIN_AIO_BYTES",
    "MIN_SWAPPABLE_BYTES",
    "swap_in_tensors",
    "swap_out_tensors",
]
