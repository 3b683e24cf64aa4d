"""Building C++ ops: JIT with torch.utils.cpp_extension + ninja (CPP ops) or the host compiler
alone (LIBRARY ops: plain C ABI libraries), and finding earlier builds.

A finished build lives in ``<root>/<facts.key>/`` with the shared library and a
``manifest.json`` written last (atomically), so a directory without a manifest is never used.
Roots searched, in order: ``$DS_KERNELS_PREBUILT`` (os.pathsep-separated), the package's
``_prebuilt/`` directory (filled by an ahead-of-time build at install), then the JIT cache
``$DS_KERNELS_CACHE`` (default ``~/.cache/ds_kernels``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from ds_kernels._toolchain import BuildFacts, Compiler

MANIFEST = "manifest.json"
# A ninja lock older than this was left by a process that died mid-build.
_STALE_LOCK_S = 600.0


class BuildError(RuntimeError):
    """A compile or link failed; the message carries the tail of the compiler output."""


def package_prebuilt_dir() -> Path:
    return Path(__file__).resolve().parent / "_prebuilt"


def cache_root() -> Path:
    env = os.environ.get("DS_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ds_kernels"


def prebuilt_roots() -> list[Path]:
    roots = [
        Path(p).expanduser()
        for p in os.environ.get("DS_KERNELS_PREBUILT", "").split(os.pathsep)
        if p
    ]
    roots.append(package_prebuilt_dir())
    return roots


def _library_of(build_dir: Path) -> Path | None:
    manifest = build_dir / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    lib = build_dir / str(data.get("library", ""))
    return lib if lib.is_file() else None


def find_exact(facts: BuildFacts, roots: list[Path]) -> Path | None:
    """A finished build with exactly these facts (compiler included)."""
    for root in roots:
        lib = _library_of(root / facts.key)
        if lib is not None:
            return lib
    return None


def find_compatible(facts: BuildFacts, roots: list[Path]) -> Path | None:
    """A finished build whose runtime facts match, whatever compiler made it.

    Used when no compiler is available here: a build made ahead of time on another machine
    with the same torch, ISA, arch and sources is as good as one made here.
    """
    want = facts.runtime_part()
    for root in roots:
        if not root.is_dir():
            continue
        for manifest in sorted(root.glob(f"{facts.op}-*/{MANIFEST}")):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            got = {k: v for k, v in data.get("facts", {}).items() if k != "compiler"}
            if got == want:
                lib = _library_of(manifest.parent)
                if lib is not None:
                    return lib
    return None


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def _tail(text: str, lines: int = 12) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def _extension_name(op: str, build_dir: Path) -> str:
    # cpp_extension remembers extension names per process and skips the build of a name it
    # has seen with the same sources, even for another directory; a per-directory name keeps
    # an ahead-of-time build and a JIT build of the same op in one process independent.
    return f"{op}_{hashlib.sha256(str(build_dir.resolve()).encode()).hexdigest()[:8]}"


def jit_build(
    facts: BuildFacts,
    sources: list[Path],
    cflags: list[str],
    ldflags: list[str],
    compiler: Compiler,
    root: Path,
    verbose: bool = False,
) -> Path:
    """Compile ``sources`` into ``root/<facts.key>/`` and return the library path.

    Raises BuildError with the compiler's last lines when the build fails.
    """
    from torch.utils.cpp_extension import load

    build_dir = root / facts.key
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir)
    started = time.time()
    try:
        lib_path = load(
            name=_extension_name(facts.op, build_dir),
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure becomes a fallback, not a crash
        raise BuildError(f"{type(exc).__name__}: {_tail(str(exc))}") from exc
    lib = Path(str(lib_path)) if lib_path else build_dir / f"{facts.op}.so"
    if not lib.is_file():
        raise BuildError(f"build reported success but {lib} does not exist")
    write_manifest(build_dir, lib, facts, compiler, time.time() - started)
    return lib


def plain_build(
    facts: BuildFacts,
    sources: list[Path],
    cflags: list[str],
    ldflags: list[str],
    compiler: Compiler,
    root: Path,
) -> Path:
    """Compile a plain C/C++ shared library (C ABI, no torch headers: a LIBRARY op) with the
    host compiler alone, no ninja, into ``root/<facts.key>/libds_<op>.so``. Published by atomic
    rename, so ranks building at once never load a half-written library. Raises BuildError."""
    assert compiler.path is not None
    build_dir = root / facts.key
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"libds_{facts.op}.so"  # not libaio.so: that is the system library's name
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".lib{facts.op}.", suffix=".so", dir=build_dir)
    os.close(fd)
    cmd = [compiler.path, *cflags, "-shared", "-fPIC", *map(str, sources), "-o", tmp, *ldflags]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        os.unlink(tmp)
        raise BuildError(f"{type(exc).__name__}: {exc}") from exc
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"{' '.join(cmd[:2])} ... exited {proc.returncode}:\n"
                         f"{_tail(proc.stderr or proc.stdout)}")  # fmt: skip
    os.replace(tmp, lib)
    write_manifest(build_dir, lib, facts, compiler, time.time() - started)
    return lib


def write_manifest(
    build_dir: Path, lib: Path, facts: BuildFacts, compiler: Compiler, seconds: float
) -> None:
    data = {
        "library": lib.name,
        "facts": facts.as_dict(),
        "compiler_path": compiler.path,
        "build_seconds": round(seconds, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = build_dir / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, build_dir / MANIFEST)
