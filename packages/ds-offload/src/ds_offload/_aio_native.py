"""ctypes binding of the C++ IO engine (csrc/aio.cpp). ctypes drops the GIL during every call,
so a Python thread blocked in ``wait`` does not stop the training loop."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ds_offload._errors import AioError

_ERRLEN = 1024
BACKENDS = {"auto": 0, "threads": 1, "kernel-aio": 2}
_NAMES = {1: "threads", 2: "kernel-aio"}


class NativeEngine:
    name = "native"

    def __init__(
        self,
        library: Path,
        block_size: int,
        queue_depth: int,
        thread_count: int,
        single_submit: bool,
        overlap_events: bool,
        use_direct: bool,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"AsyncIO: native_backend must be one of {sorted(BACKENDS)}, not {backend!r}"
            )
        lib = ctypes.CDLL(str(library))
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.ds_aio_create.restype = vp
        lib.ds_aio_create.argtypes = [i64, i32, i32, i32, i32, i32, i32]
        lib.ds_aio_backend.restype = i32
        lib.ds_aio_backend.argtypes = [vp]
        lib.ds_aio_destroy.argtypes = [vp]
        lib.ds_aio_submit.restype = i32
        lib.ds_aio_submit.argtypes = [vp, i32, vp, i64, ctypes.c_char_p, i64, ctypes.c_char_p, i32]
        lib.ds_aio_wait.restype = i64
        lib.ds_aio_wait.argtypes = [vp, ctypes.POINTER(i32), ctypes.c_char_p, i32]
        lib.ds_aio_outstanding.restype = i64
        lib.ds_aio_outstanding.argtypes = [vp]
        self._lib = lib
        handle = lib.ds_aio_create(
            block_size, queue_depth, thread_count, int(single_submit), int(overlap_events),
            int(use_direct), BACKENDS[backend],
        )  # fmt: skip
        if not handle:
            if backend == "kernel-aio":
                raise RuntimeError(
                    "ds_offload: the kernel refused an AIO context (io_setup failed: no kernel "
                    "AIO, /proc/sys/fs/aio-max-nr exhausted, or a seccomp profile); use "
                    "native_backend='auto' or 'threads'"
                )
            raise ValueError("ds_offload: the native IO engine rejected its settings")
        self._h: int | None = handle
        #: "kernel-aio" (io_submit, O_DIRECT blocks) or "threads" (blocking pread/pwrite pool)
        self.backend = _NAMES[int(lib.ds_aio_backend(handle))]

    def submit(self, write: bool, ptr: int, nbytes: int, path: str, offset: int) -> None:
        err = ctypes.create_string_buffer(_ERRLEN)
        rc = self._lib.ds_aio_submit(
            self._h, int(write), ptr, nbytes, path.encode(), offset, err, _ERRLEN
        )
        if rc != 0:
            raise AioError(-rc, err.value.decode(errors="replace"), path)

    def wait(self) -> int:
        err_no = ctypes.c_int(0)
        err = ctypes.create_string_buffer(_ERRLEN)
        done = self._lib.ds_aio_wait(self._h, ctypes.byref(err_no), err, _ERRLEN)
        if err_no.value:
            raise AioError(err_no.value, err.value.decode(errors="replace"))
        return int(done)

    def outstanding(self) -> int:
        return int(self._lib.ds_aio_outstanding(self._h))

    def close(self) -> None:
        if self._h is not None:
            self._lib.ds_aio_destroy(self._h)  # joins the IO threads after the queue drains
            self._h = None
