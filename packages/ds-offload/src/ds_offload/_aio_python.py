"""The pure-Python IO engine: the same request splitting as the C++ engine, with os.preadv /
os.pwritev in a thread pool (both drop the GIL). Used where the C++ library cannot be built."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ds_offload._errors import AioError
from ds_offload._pinned import DIRECT_ALIGN

_Block = tuple[int, int, int, bool]  # (address, length, file offset, direct)


class PythonEngine:
    name = "python"

    def __init__(
        self,
        block_size: int,
        queue_depth: int,
        thread_count: int,
        single_submit: bool,
        overlap_events: bool,
        use_direct: bool,
    ) -> None:
        self.block_size = block_size
        self.queue_depth = queue_depth
        self.single_submit = single_submit
        self.overlap_events = overlap_events
        self.use_direct = use_direct and hasattr(os, "O_DIRECT")
        self._io = ThreadPoolExecutor(thread_count * queue_depth, thread_name_prefix="ds-aio")
        # Requests that issue their blocks in waves run a driver each (they wait on the IO pool,
        # so they must not occupy IO threads).
        self._drivers = ThreadPoolExecutor(max(1, thread_count), thread_name_prefix="ds-aio-drv")
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []

    # ---------------------------------------------------------------- request execution
    def _blocks(self, ptr: int, nbytes: int, offset: int, direct_ok: bool) -> list[_Block]:
        body = 0
        if direct_ok and ptr % DIRECT_ALIGN == 0 and offset % DIRECT_ALIGN == 0:
            body = nbytes // DIRECT_ALIGN * DIRECT_ALIGN
        dstep = max(DIRECT_ALIGN, self.block_size // DIRECT_ALIGN * DIRECT_ALIGN)
        out = [(ptr + p, min(dstep, body - p), offset + p, True) for p in range(0, body, dstep)]
        out += [
            (ptr + p, min(self.block_size, nbytes - p), offset + p, False)
            for p in range(body, nbytes, self.block_size)
        ]
        return out

    @staticmethod
    def _io_block(write: bool, fds: tuple[int, int], block: _Block, path: str) -> None:
        addr, length, off, direct = block
        fd = fds[1] if direct else fds[0]
        done = 0
        while done < length:
            view = memoryview((ctypes.c_char * (length - done)).from_address(addr + done)).cast("B")
            try:
                n = (
                    os.pwritev(fd, [view], off + done)
                    if write
                    else os.preadv(fd, [view], off + done)
                )
            except OSError as exc:
                op = "pwrite" if write else "pread"
                raise AioError(
                    exc.errno, f"{op}({path}) at offset {off + done} failed: {exc.strerror}", path
                ) from None
            if n == 0:
                raise AioError(
                    errno.EIO,
                    f"pread({path}): the file ends before offset {off + length} (it is shorter "
                    "than the tensor being read)",
                    path,
                )
            done += n

    def _run_request(
        self, write: bool, fds: tuple[int, int], blocks: list[_Block], path: str
    ) -> None:
        try:
            if self.single_submit:
                for b in blocks:
                    self._io_block(write, fds, b, path)
                return
            wave = len(blocks) if self.overlap_events else self.queue_depth
            for start in range(0, len(blocks), wave):
                futs = [
                    self._io.submit(self._io_block, write, fds, b, path)
                    for b in blocks[start : start + wave]
                ]
                for f in futs:
                    f.result()
        finally:
            for fd in set(fds):
                if fd >= 0:
                    os.close(fd)

    # ---------------------------------------------------------------- engine interface
    def submit(self, write: bool, ptr: int, nbytes: int, path: str, offset: int) -> None:
        flags = (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise AioError(exc.errno, f"open({path}) failed: {exc.strerror}", path) from None
        fd_direct = -1
        if self.use_direct and nbytes >= DIRECT_ALIGN:
            try:
                fd_direct = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:  # tmpfs refuses O_DIRECT: buffered IO is correct there
                fd_direct = -1
        blocks = self._blocks(ptr, nbytes, offset, fd_direct >= 0)
        if fd_direct >= 0 and not any(b[3] for b in blocks):
            os.close(fd_direct)
            fd_direct = -1
        fds = (fd, fd_direct)
        pool = self._io if self.single_submit or self.overlap_events else self._drivers
        if self.overlap_events and not self.single_submit:
            # All blocks at once, straight into the IO pool; one future per block.
            futs = [self._io.submit(self._io_block, write, fds, b, path) for b in blocks]
            fut = self._drivers.submit(self._join_and_close, futs, fds)
        else:
            fut = pool.submit(self._run_request, write, fds, blocks, path)
        with self._lock:
            self._pending.append(fut)

    @staticmethod
    def _join_and_close(futs: list[Future[None]], fds: tuple[int, int]) -> None:
        try:
            first: BaseException | None = None
            for f in futs:
                exc = f.exception()
                if exc is not None and first is None:
                    first = exc
            if first is not None:
                raise first
        finally:
            for fd in set(fds):
                if fd >= 0:
                    os.close(fd)

    def wait(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for f in pending:
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first
        return len(pending)

    def outstanding(self) -> int:
        with self._lock:
            return sum(not f.done() for f in self._pending)

    def close(self) -> None:
        self.wait_quietly()
        self._drivers.shutdown(wait=True)
        self._io.shutdown(wait=True)

    def wait_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self.wait()
