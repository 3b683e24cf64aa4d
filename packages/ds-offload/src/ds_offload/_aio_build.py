"""The C++ async IO library through ds-kernels' op registry (op ``aio``, see ``_aio_op``), or
why the Python engine is used.

The registry builds it once per source, compiler and flags into its cache
(``$DS_KERNELS_CACHE``, default ``~/.cache/ds_kernels``; published by atomic rename, so ranks
building at the same time never load a half-written library), uses an ahead-of-time build when
there is one, and warns once (``KernelBuildWarning``) when it falls back. Set
``DS_KERNELS_FORCE_FALLBACK=aio`` (or ``all``) to force the pure-Python engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

OP_NAME = "aio"


@dataclass(frozen=True)
class BuildResult:
    library: Path | None  # None: use the Python engine
    reason: str  # where the library came from, or why there is none


_lock = threading.Lock()


def _load():
    import ds_kernels

    try:
        return ds_kernels.load(OP_NAME)
    except KeyError:
        # no package metadata (sources on PYTHONPATH): the entry point is not visible
        from ds_offload._aio_op import AIO_OP

        ds_kernels.register_op(AIO_OP)
        return ds_kernels.load(OP_NAME)


def build_library() -> BuildResult:
    """The library, building it on first use; never raises for a missing toolchain."""
    with _lock:
        op = _load()
        return BuildResult(getattr(op, "library", None), op.detail)


def forget() -> None:
    """Forget the loaded op (tests load again under another environment)."""
    from ds_kernels._ops import default_registry

    with _lock:
        default_registry().forget(OP_NAME)
