"""The C++ async IO library (csrc/aio.cpp) as a ds-kernels op of kind LIBRARY: plain C++ with a
C ABI, no torch headers, built by the host compiler alone (about a second, no ninja) and cached,
prebuilt (``DS_BUILD_OPS=1`` / ``python -m ds_kernels.build``), forced to its fallback
(``DS_KERNELS_FORCE_FALLBACK=aio``) and listed by ``ds-report`` like ds-kernels' own ops.

Registered through the entry-point group ``ds_kernels.ops`` of the installed package, and by
``_aio_build`` at first use where there is no package metadata (sources on PYTHONPATH).
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

from ds_kernels import OpImpl, OpKind, OpSpec

SOURCE = Path(__file__).resolve().parent / "csrc" / "aio.cpp"


class AioLibrary(OpImpl):
    """The built library's path, or None for the Python engine (the fallback)."""

    def __init__(self, library: Path | None) -> None:
        self.library = library


def _bind(lib: Path) -> OpImpl:
    handle = ctypes.CDLL(str(lib))
    if not hasattr(handle, "ds_aio_backend"):  # a library of another version of the source
        raise OSError(f"{lib} does not export ds_aio_backend")
    return AioLibrary(lib)


def _unavailable() -> str | None:
    if platform.system() != "Linux":
        return f"the C++ engine needs Linux (O_DIRECT, kernel AIO), not {platform.system()}"
    return None


AIO_OP = OpSpec(
    name="aio",
    summary="async file IO for offload (C++: kernel AIO or a thread pool, O_DIRECT)",
    kind=OpKind.LIBRARY,
    fallback=lambda: AioLibrary(None),
    sources=(str(SOURCE),),
    extra_cflags=("-O2", "-std=c++17", "-pthread"),
    bind=_bind,
    unavailable=_unavailable,
    fallback_name="pure-Python IO engine",
)
