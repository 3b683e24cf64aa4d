"""What ``AsyncIOBuilder().load()`` returns: a module holding ``aio_handle``, DeepSpeed's async
IO handle, over ``ds_offload.AsyncIO``.

Same constructor (``block_size``, ``queue_depth``, ``single_submit``, ``overlap_events``,
``intra_op_parallelism``: ds_offload's ``thread_count``) and methods; reads and writes return
the count of completed operations as DeepSpeed's do, ``async_*`` return 0 and ``wait()`` the
count completed since the last wait. ``validate`` re-reads the file and compares it with the
buffer (synchronous calls only).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ds_offload import DIRECT_ALIGN, AsyncIO


def _check_same(buffer: torch.Tensor, filename: str, file_offset: int) -> None:
    nbytes = buffer.numel() * buffer.element_size()
    with open(filename, "rb") as f:
        f.seek(file_offset)
        on_disk = f.read(nbytes)
    mine = buffer.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    if on_disk != mine:
        raise RuntimeError(
            f"aio validate: {filename} at offset {file_offset} differs from the buffer"
        )


class aio_handle:  # noqa: N801 - DeepSpeed's class name
    """Reads and writes whole tensors to files through ds_offload's IO engine."""

    def __init__(self, block_size: int = 1024 * 1024, queue_depth: int = 128,
                 single_submit: bool = False, overlap_events: bool = False,
                 intra_op_parallelism: int = 1) -> None:  # fmt: skip
        self._io = AsyncIO(
            block_size=block_size,
            queue_depth=queue_depth,
            thread_count=intra_op_parallelism,
            single_submit=single_submit,
            overlap_events=overlap_events,
        )

    # -------------------------------------------------------------- settings
    def get_block_size(self) -> int:
        return self._io.block_size

    def get_queue_depth(self) -> int:
        return self._io.queue_depth

    def get_single_submit(self) -> bool:
        return self._io.single_submit

    def get_overlap_events(self) -> bool:
        return self._io.overlap_events

    def get_intra_op_parallelism(self) -> int:
        return self._io.thread_count

    def get_alignment(self) -> int:
        return DIRECT_ALIGN

    # -------------------------------------------------------------- IO
    def _io_op(self, write: bool, buffer: torch.Tensor, filename: str | os.PathLike[str],
               validate: bool, is_async: bool, file_offset: int) -> int:  # fmt: skip
        if validate and is_async:
            raise ValueError("aio_handle: validate=True needs a synchronous call (async=False)")
        op = self._io.pwrite if write else self._io.pread
        op(buffer, filename, file_offset, async_op=True)
        if is_async:
            return 0
        done = self._io.wait()
        if validate:
            _check_same(buffer, os.fspath(filename), file_offset)
        return done

    def pread(self, buffer: torch.Tensor, filename: str, validate: bool, is_async: bool,
              file_offset: int = 0) -> int:  # fmt: skip
        """Read ``buffer`` from ``filename``; DeepSpeed's fourth argument is ``async``."""
        return self._io_op(False, buffer, filename, validate, is_async, file_offset)

    def pwrite(self, buffer: torch.Tensor, filename: str, validate: bool, is_async: bool,
               file_offset: int = 0) -> int:  # fmt: skip
        return self._io_op(True, buffer, filename, validate, is_async, file_offset)

    def read(
        self, buffer: torch.Tensor, filename: str, validate: bool, file_offset: int = 0
    ) -> int:
        return self._io_op(False, buffer, filename, validate, False, file_offset)

    def write(
        self, buffer: torch.Tensor, filename: str, validate: bool, file_offset: int = 0
    ) -> int:
        return self._io_op(True, buffer, filename, validate, False, file_offset)

    def sync_pread(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int:
        return self._io_op(False, buffer, filename, False, False, file_offset)

    def sync_pwrite(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int:
        return self._io_op(True, buffer, filename, False, False, file_offset)

    def async_pread(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int:
        return self._io_op(False, buffer, filename, False, True, file_offset)

    def async_pwrite(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int:
        return self._io_op(True, buffer, filename, False, True, file_offset)

    def wait(self) -> int:
        """Block until every submitted request finished; the count finished since the last
        wait (errors raise ``ds_offload.AioError``)."""
        return self._io.wait()

    # -------------------------------------------------------------- buffers
    def new_cpu_locked_tensor(self, num_elem: int, example_tensor: torch.Tensor) -> torch.Tensor:
        """An aligned, page-locked host tensor of ``num_elem`` elements of the example's dtype."""
        return self._io.new_pinned_tensor(num_elem, example_tensor.dtype)

    def free_cpu_locked_tensor(self, tensor: Any) -> bool:
        """Nothing to release by hand: the memory goes with the tensor's last reference."""
        del tensor
        return True

    def is_pinned(self, buffer: torch.Tensor) -> bool:
        return bool(buffer.is_pinned())


__all__ = ["aio_handle"]
