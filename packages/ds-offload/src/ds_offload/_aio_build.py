"""Build (once, cached) the C++ async IO library, or report why the Python engine is used.

The library is plain C++ with a C ABI (no torch headers), so it builds in about a second with
the host compiler alone and does not need ninja. Builds are cached under
``$DS_KERNELS_CACHE`` (default ``~/.cache/ds_kernels``) in a directory keyed by the source,
compiler and flags, and published with an atomic rename so that ranks building at the same time
never load a half-written library.

Set ``DS_KERNELS_FORCE_FALLBACK=aio`` (or ``all``) to force the pure-Python engine.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "aio.cpp"
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-pthread")
OP_NAME = "aio"


@dataclass(frozen=True)
class BuildResult:
    library: Path | None  # None: use the Python engine
    reason: str  # where the library came from, or why there is none


def _cache_root() -> Path:
    env = os.environ.get("DS_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ds_kernels"


def _forced_fallback() -> bool:
    forced = {s.strip() for s in os.environ.get("DS_KERNELS_FORCE_FALLBACK", "").split(",")}
    return OP_NAME in forced or "all" in forced


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "c++")


def _key(compiler: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(compiler.encode())
    h.update(platform.machine().encode())
    return f"{OP_NAME}-{platform.machine().lower()}-{h.hexdigest()[:16]}"


_lock = threading.Lock()
_result: BuildResult | None = None


def build_library() -> BuildResult:
    """The cached library, building it on first use; never raises for a missing toolchain."""
    global _result
    with _lock:
        if _result is None:
            _result = _build_uncached()
        return _result


def forget() -> None:
    """Forget the cached result (tests load again under another environment)."""
    global _result
    with _lock:
        _result = None


def _build_uncached() -> BuildResult:
    if _forced_fallback():
        return BuildResult(None, "DS_KERNELS_FORCE_FALLBACK asks for the Python engine")
    if platform.system() != "Linux":
        return BuildResult(None, f"the C++ engine needs Linux (O_DIRECT), not {platform.system()}")
    compiler = _compiler()
    if compiler is None:
        return BuildResult(
            None, "no C++ compiler on PATH (install g++ or clang++, or set CXX to one)"
        )
    out_dir = _cache_root() / _key(compiler)
    lib = out_dir / "libds_aio.so"
    if lib.is_file():
        return BuildResult(lib, f"cached build {lib}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".libds_aio.", suffix=".so", dir=out_dir)
        os.close(fd)
        proc = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            os.unlink(tmp)
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
            return BuildResult(None, f"building {SOURCE.name} with {compiler} failed:\n{tail}")
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as exc:
        return BuildResult(None, f"building {SOURCE.name} failed: {exc}")
    return BuildResult(lib, f"built {lib}")
