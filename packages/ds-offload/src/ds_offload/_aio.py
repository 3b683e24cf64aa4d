"""``AsyncIO``: the handle the offload engines read and write tensors through.

    >>> aio = AsyncIO(block_size=1 << 20, queue_depth=8, thread_count=1)
    >>> buf = aio.new_pinned_tensor(n, torch.float32)      # aligned: O_DIRECT covers it
    >>> aio.pwrite(buf, "/nvme/x.bin", async_op=True); ...; aio.wait()
    >>> aio.pread(buf, "/nvme/x.bin")                       # synchronous

Requests go to the C++ engine (built on first use and cached) or, where it cannot be built, to
the Python engine, with one warning. A tensor handed to an async call must stay untouched until
``wait()``; the handle keeps a reference so that it cannot be freed meanwhile.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import torch

from ds_offload import _aio_build
from ds_offload._aio_native import NativeEngine
from ds_offload._aio_python import PythonEngine
from ds_offload._pinned import aligned_empty

if TYPE_CHECKING:
    pass


def _engine_for(choice: str, native_backend: str, **knobs: Any) -> NativeEngine | PythonEngine:
    if choice == "python":
        return PythonEngine(**knobs)
    # ds-kernels' registry builds (or finds) the library; where it cannot, it has warned once
    # (KernelBuildWarning naming what is missing) and the Python engine is used
    built = _aio_build.build_library()
    if built.library is not None:
        return NativeEngine(built.library, backend=native_backend, **knobs)
    if choice == "native":
        raise RuntimeError(f"ds_offload: the native IO engine is unavailable: {built.reason}")
    return PythonEngine(**knobs)


def _check_tensor(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"AsyncIO.{what}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(
            f"AsyncIO.{what}: the tensor is on {tensor.device}; file IO needs a CPU tensor "
            "(copy it into a pinned host buffer first: AsyncIO.new_pinned_tensor)"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"AsyncIO.{what}: the tensor is not contiguous; call .contiguous() first")


class AsyncIO:
    """Read and write whole tensors to files, synchronously or asynchronously.

    block_size: bytes per IO; queue_depth: IOs in flight per submitting thread; thread_count:
    submitting threads; single_submit: issue a request's blocks one at a time, in order;
    overlap_events: when False, issue a request's blocks in waves of queue_depth, each finished
    before the next; use_direct: O_DIRECT for the aligned body of each request (buffered IO for
    unaligned tails, and where the filesystem refuses O_DIRECT); engine: "auto" (C++, else
    Python with a warning), "native" or "python"; native_backend (C++ engine): "auto" (kernel
    AIO, each submitting thread with a context of queue_depth requests, when the kernel allows
    it and use_direct is on; else "threads"), "kernel-aio" (an error where unavailable) or
    "threads" (thread_count * queue_depth threads of blocking pread/pwrite).
    """

    def __init__(
        self,
        block_size: int = 1_048_576,
        queue_depth: int = 8,
        thread_count: int = 1,
        single_submit: bool = False,
        overlap_events: bool = True,
        use_direct: bool = True,
        engine: str = "auto",
        native_backend: str = "auto",
    ) -> None:
        for name, value in (
            ("block_size", block_size),
            ("queue_depth", queue_depth),
            ("thread_count", thread_count),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AsyncIO: {name} must be a positive integer, got {value!r}")
        if engine not in ("auto", "native", "python"):
            raise ValueError(
                f"AsyncIO: engine must be 'auto', 'native' or 'python', not {engine!r}"
            )
        self.block_size = block_size
        self.queue_depth = queue_depth
        self.thread_count = thread_count
        self.single_submit = bool(single_submit)
        self.overlap_events = bool(overlap_events)
        self.use_direct = bool(use_direct)
        self._engine = _engine_for(
            engine,
            native_backend,
            block_size=block_size,
            queue_depth=queue_depth,
            thread_count=thread_count,
            single_submit=self.single_submit,
            overlap_events=self.overlap_events,
            use_direct=self.use_direct,
        )
        self._inflight: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> AsyncIO:
        """A handle with the knobs of an ``aio`` config section (dict, ``AioConfig`` or
        ``AioOptions``)."""
        from ds_offload._coerce import coerce
        from ds_offload._options import AioOptions

        config = coerce(AioOptions, config, "aio")
        knobs = dict(
            block_size=config.block_size,
            queue_depth=config.queue_depth,
            thread_count=config.thread_count,
            single_submit=config.single_submit,
            overlap_events=config.overlap_events,
            use_direct=config.use_direct,
        )
        knobs.update(overrides)
        return cls(**knobs)

    @property
    def engine(self) -> str:
        """'native' (C++) or 'python'."""
        return self._engine.name

    @property
    def backend(self) -> str:
        """How IO is issued: 'kernel-aio' (the C++ engine's io_submit contexts, for O_DIRECT
        IO), 'threads' (its pool of blocking pread/pwrite threads) or 'python'."""
        return getattr(self._engine, "backend", "python")

    # ------------------------------------------------------------------ requests
    def _submit(
        self,
        write: bool,
        tensor: torch.Tensor,
        path: str | os.PathLike[str],
        offset: int,
        async_op: bool,
    ) -> int:
        what = "pwrite" if write else "pread"
        _check_tensor(tensor, what)
        if offset < 0:
            raise ValueError(f"AsyncIO.{what}: offset must be >= 0, got {offset}")
        nbytes = tensor.numel() * tensor.element_size()
        path_s = os.fspath(path)
        if not async_op:
            # A synchronous call must not collect errors of earlier async requests: drain them
            # first (surfacing their errors), then run this one alone.
            self.wait()
        with self._lock:
            self._engine.submit(write, tensor.data_ptr(), nbytes, path_s, offset)
            self._inflight.append(tensor)
        if not async_op:
            self.wait()
        return nbytes

    def pread(
        self,
        tensor: torch.Tensor,
        path: str | os.PathLike[str],
        offset: int = 0,
        async_op: bool = False,
    ) -> int:
        """Fill ``tensor`` from ``path`` starting at byte ``offset``; returns the byte count."""
        return self._submit(False, tensor, path, offset, async_op)

    def pwrite(
        self,
        tensor: torch.Tensor,
        path: str | os.PathLike[str],
        offset: int = 0,
        async_op: bool = False,
    ) -> int:
        """Write ``tensor`` to ``path`` at byte ``offset`` (created if missing, not truncated)."""
        return self._submit(True, tensor, path, offset, async_op)

    # DeepSpeed's aio_handle names.
    def sync_pread(
        self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0
    ) -> int:
        return self.pread(tensor, path, offset)

    def sync_pwrite(
        self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0
    ) -> int:
        return self.pwrite(tensor, path, offset)

    def async_pread(
        self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0
    ) -> int:
        return self.pread(tensor, path, offset, async_op=True)

    def async_pwrite(
        self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0
    ) -> int:
        return self.pwrite(tensor, path, offset, async_op=True)

    def wait(self) -> int:
        """Block until every submitted request finished; returns how many finished since the
        previous wait. Raises ``AioError`` (errno, path) if any of them failed."""
        try:
            return self._engine.wait()
        finally:
            with self._lock:
                self._inflight.clear()

    def outstanding(self) -> int:
        return self._engine.outstanding()

    # ------------------------------------------------------------------ buffers
    @staticmethod
    def new_pinned_tensor(
        shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32, pin: bool = True
    ) -> torch.Tensor:
        """An aligned (O_DIRECT-ready), page-locked host tensor; pageable with a warning when
        the lockable limit is exceeded."""
        return aligned_empty(shape, dtype, pin=pin)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._engine.close()

    def __enter__(self) -> AsyncIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
