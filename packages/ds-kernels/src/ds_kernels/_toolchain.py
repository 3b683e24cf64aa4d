"""What a build depends on: the C++ compiler, ninja, the CPU ISA, the CUDA arch, torch.

These facts name the cache directory of a build (`BuildFacts.key`), so a build is reused only
where it is valid: same torch, same compiler, same ISA, same arch, same sources and flags.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# Most capable first: the label of a cache directory names the best extension the host has.
_ISA_RANK = ("avx512f", "avx2", "avx", "sse4_2", "sve", "neon")


@dataclasses.dataclass(frozen=True)
class Compiler:
    """The host C++ compiler that a JIT build would use (``$CXX``, else ``c++``)."""

    requested: str  # what $CXX (or the default) names
    path: str | None  # resolved executable; None when it cannot be found
    version: str  # first line of `--version`; "" when unknown

    @property
    def ident(self) -> str:
        return self.version or "unknown"


@dataclasses.dataclass(frozen=True)
class BuildFacts:
    """Everything a compiled op's validity depends on. Equal facts => reusable build."""

    op: str
    torch: str
    python: str
    machine: str
    compiler: str  # compiler identity; "" means "any" (lookup without a compiler)
    cpu_isa: tuple[str, ...]
    cuda_arch: tuple[str, ...]
    sources_sha: str
    flags: tuple[str, ...]

    def runtime_part(self) -> dict[str, object]:
        """The facts that matter when loading (the compiler that made it does not)."""
        d = dataclasses.asdict(self)
        d.pop("compiler")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def key(self) -> str:
        """Directory name: readable prefix plus a hash of every fact."""
        digest = hashlib.sha256(repr(sorted(self.as_dict().items())).encode()).hexdigest()[:16]
        torch_short = self.torch.split("+")[0]
        isa = next((i for i in _ISA_RANK if i in self.cpu_isa), "noisa")
        return f"{self.op}-torch{torch_short}-{isa}-{digest}"


def compiler_requested() -> str:
    return os.environ.get("CXX") or "c++"


@functools.lru_cache(maxsize=8)
def _probe_compiler(requested: str, path_env: str) -> Compiler:
    # path_env is part of the cache key so a test that changes PATH sees a fresh probe.
    path = shutil.which(requested, path=path_env)
    if path is None:
        return Compiler(requested=requested, path=None, version="")
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        first = (out.stdout or out.stderr).strip().splitlines()
        version = first[0].strip() if first else ""
    except (OSError, subprocess.SubprocessError):
        return Compiler(requested=requested, path=None, version="")
    return Compiler(requested=requested, path=path, version=version)


def find_compiler() -> Compiler:
    return _probe_compiler(compiler_requested(), os.environ.get("PATH", ""))


def ninja_available() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return bool(is_ninja_available())


def cpu_isa() -> tuple[str, ...]:
    """SIMD extensions of this host (via ds_accel, which reads /proc/cpuinfo)."""
    try:
        from ds_accel import cpu_isa as accel_cpu_isa

        return tuple(accel_cpu_isa())
    except ImportError:  # pragma: no cover - ds_accel is a declared dependency
        return ()


def host_cxx_flags() -> list[str]:
    """Host compiler flags from the accelerator (-O3, -fopenmp, -march=native where safe)."""
    flags: list[str]
    try:
        from ds_accel import get_accelerator

        flags = list(get_accelerator().build_flags().get("cxx", []))
    except Exception:  # noqa: BLE001 - a broken accelerator plugin must not stop CPU ops
        flags = ["-O3", "-std=c++17", "-fopenmp"]
        if platform.machine().lower() in ("x86_64", "amd64"):
            flags.append("-march=native")
    # NEON is baseline on aarch64; -mcpu=native adds SVE/dot-product where present.
    on_arm = platform.machine().lower() in ("aarch64", "arm64")
    has_arch = any(f.startswith(("-mcpu", "-march")) for f in flags)
    if on_arm and not has_arch and os.environ.get("DS_BUILD_PORTABLE") != "1":
        flags.append("-mcpu=native")
    return flags


def cuda_arch() -> tuple[str, ...]:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return tuple(env.replace(";", " ").split())
    if not torch.cuda.is_available():
        return ()
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return tuple(f"{a}.{b}" for a, b in sorted(caps))


def sources_sha(sources: list[Path]) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def build_facts(
    op: str, sources: list[Path], flags: list[str], compiler: Compiler | None, uses_cuda: bool
) -> BuildFacts:
    return BuildFacts(
        op=op,
        torch=torch.__version__,
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        machine=platform.machine().lower(),
        compiler=compiler.ident if compiler is not None else "",
        cpu_isa=cpu_isa(),
        cuda_arch=cuda_arch() if uses_cuda else (),
        sources_sha=sources_sha(sources),
        flags=tuple(flags),
    )
