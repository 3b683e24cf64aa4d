"""The ``offload`` section of ``ds-report`` (entry-point group ``ds_report.sections``): which
async IO engine ``AsyncIO`` would use and why, its backend (kernel AIO or threads), whether the temp directory takes O_DIRECT, and
the page-locking limit that decides whether pinned buffers fall back to pageable memory."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ds_offload._aio_build import build_library
from ds_offload._pinned import memlock_limit


def _o_direct(directory: str) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    fd, path = tempfile.mkstemp(dir=directory, prefix=".ds-report-")
    os.close(fd)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def _backend(built: Any) -> str:
    """The native engine's backend for O_DIRECT IO: kernel AIO where io_setup works."""
    if built.library is None:
        return "python"
    from ds_offload._aio_native import NativeEngine

    engine = NativeEngine(built.library, 1 << 20, 8, 1, False, True, True)
    try:
        return engine.backend
    finally:
        engine.close()


def offload_report() -> dict[str, Any]:
    built = build_library()  # cached: builds once (about a second) or says why it cannot
    tmp = tempfile.gettempdir()
    limit = memlock_limit()
    return {
        "aio engine": "native" if built.library is not None else "python",
        "aio engine reason": built.reason,
        "aio backend (O_DIRECT)": _backend(built),
        f"O_DIRECT in {tmp}": _o_direct(tmp),
        "memlock limit": "unlimited" if limit is None else f"{limit} bytes",
    }
