"""The op registry: load an op as a compiled build, or as its pure-PyTorch fallback.

`load(name)` never raises because of the build environment. Order of attempts for a C++ op:
1. a finished build with exactly this environment's facts (prebuilt roots, then JIT cache);
2. with no compiler here: any finished build whose runtime facts match (an AOT build made on
   another machine);
3. a JIT build with torch.utils.cpp_extension + ninja into the cache;
4. the fallback, with ONE `KernelBuildWarning` per op and process naming what was missing.
A Triton op is "native" when Triton imports and its device check passes, else fallback.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from ds_kernels import _build, _toolchain

CSRC = Path(__file__).resolve().parent / "csrc"
FORCE_FALLBACK_ENV = "DS_KERNELS_FORCE_FALLBACK"


class KernelBuildWarning(UserWarning):
    """An op is running as its pure-PyTorch fallback; the message says why and how to fix it."""


class Backend(enum.Enum):
    """Where a loaded op's code comes from."""

    PREBUILT = "prebuilt"  # library from an ahead-of-time build (DS_BUILD_OPS=1 / ds_kernels.build)
    CACHED = "cached"  # library from an earlier JIT build in the cache
    JIT = "jit"  # library compiled by this process
    TRITON = "triton"  # Triton kernels, compiled by Triton at first launch
    FALLBACK = "fallback"  # pure PyTorch


class OpKind(enum.Enum):
    CPP = "cpp"  # torch C++ extension source, built with cpp_extension + ninja, bound by ctypes
    LIBRARY = "library"  # plain C/C++ with a C ABI (no torch headers): host compiler alone
    TRITON = "triton"


class OpImpl:
    """Base of every op implementation; the registry fills `backend` and `detail`."""

    backend: Backend = Backend.FALLBACK
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How to build, bind and replace one op."""

    name: str
    summary: str
    kind: OpKind
    fallback: Callable[[], OpImpl]
    # CPP / LIBRARY ops: sources (under csrc/, or absolute paths for another package's op),
    # flags, and how to wrap the built library.
    sources: tuple[str, ...] = ()
    extra_cflags: tuple[str, ...] = ()
    extra_ldflags: tuple[str, ...] = ()
    bind: Callable[[Path], OpImpl] | None = None
    # A reason the native path cannot run here, or None (TRITON ops: then `native()`; CPP and
    # LIBRARY ops: checked before any build, e.g. an OS the source does not support).
    unavailable: Callable[[], str | None] | None = None
    native: Callable[[], OpImpl] | None = None
    # what the fallback is, for the warning ("pure-PyTorch fallback", "pure-Python engine")
    fallback_name: str = "pure-PyTorch fallback"

    def source_paths(self) -> list[Path]:
        return [Path(s) if Path(s).is_absolute() else CSRC / s for s in self.sources]

    def cflags(self) -> list[str]:
        if self.kind is OpKind.LIBRARY:
            return list(self.extra_cflags)  # its own flags: no torch, no OpenMP unless asked
        return [*_toolchain.host_cxx_flags(), *self.extra_cflags]


@dataclasses.dataclass(frozen=True)
class OpStatus:
    """What `ds-report` says about an op, found without building anything."""

    name: str
    summary: str
    compatible: bool  # could be built (or run natively) here
    built: bool  # a finished build usable here exists (or native Triton)
    loaded: str | None  # backend value if this process has loaded it
    detail: str  # why not compatible / where the build is


def _forced_fallback(name: str) -> bool:
    forced = {s.strip() for s in os.environ.get(FORCE_FALLBACK_ENV, "").split(",") if s.strip()}
    return name in forced or "all" in forced


class OpRegistry:
    """Specs by name plus the ops this process has loaded (each built and warned about once)."""

    def __init__(self) -> None:
        self._specs: dict[str, OpSpec] = {}
        self._loaded: dict[str, OpImpl] = {}
        # One lock per registry: two threads loading the same op must not build it twice.
        self._lock = threading.RLock()

    def register(self, spec: OpSpec, replace: bool = False) -> None:
        if spec.name in self._specs and not replace:
            raise ValueError(f"op {spec.name!r} is already registered")
        if spec.kind is not OpKind.TRITON and spec.bind is None:
            raise ValueError(f"op {spec.name!r}: a {spec.kind.value} op needs bind=")
        self._specs[spec.name] = spec
        self._loaded.pop(spec.name, None)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> OpSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown op {name!r}; known ops: {', '.join(self.names())}") from None

    def load(self, name: str) -> OpImpl:
        spec = self.spec(name)
        with self._lock:
            op = self._loaded.get(name)
            if op is None:
                op = self._load_uncached(spec)
                self._loaded[name] = op
            return op

    def forget(self, name: str | None = None) -> None:
        """Drop loaded ops (tests use this to load again under another environment)."""
        with self._lock:
            if name is None:
                self._loaded.clear()
            else:
                self._loaded.pop(name, None)

    # ------------------------------------------------------------------ loading
    def _load_uncached(self, spec: OpSpec) -> OpImpl:
        if _forced_fallback(spec.name):
            return self._fallback(spec, f"{FORCE_FALLBACK_ENV} asks for the fallback")
        if spec.kind is OpKind.TRITON:
            return self._load_triton(spec)
        why = spec.unavailable() if spec.unavailable is not None else None
        if why is not None:
            return self._fallback(spec, why)
        return self._load_cpp(spec)

    def _fallback(self, spec: OpSpec, why: str) -> OpImpl:
        op = spec.fallback()
        op.backend = Backend.FALLBACK
        op.detail = why
        warnings.warn(
            f"ds_kernels op {spec.name!r} uses its {spec.fallback_name} (slower): {why}",
            KernelBuildWarning,
            stacklevel=4,
        )
        return op

    def _load_triton(self, spec: OpSpec) -> OpImpl:
        assert spec.unavailable is not None and spec.native is not None
        why = spec.unavailable()
        if why is not None:
            return self._fallback(spec, why)
        try:
            op = spec.native()
        except Exception as exc:  # noqa: BLE001 - a broken Triton install means fallback
            return self._fallback(spec, f"Triton kernels failed to load: {exc}")
        op.backend = Backend.TRITON
        op.detail = "Triton kernels (compiled at first launch)"
        return op

    def _bind(self, spec: OpSpec, lib: Path, backend: Backend) -> OpImpl | None:
        assert spec.bind is not None
        try:
            op = spec.bind(lib)
        except OSError as exc:  # e.g. built for another CPU, missing libgomp at runtime
            warnings.warn(
                f"ds_kernels op {spec.name!r}: cannot load {lib}: {exc}",
                KernelBuildWarning,
                stacklevel=5,
            )
            return None
        op.backend = backend
        op.detail = str(lib)
        return op

    @staticmethod
    def _candidates(facts, prebuilt: list[Path], cache: Path, have_compiler: bool):
        yield Backend.PREBUILT, _build.find_exact(facts, prebuilt)
        yield Backend.PREBUILT, _build.find_compatible(facts, prebuilt)
        if have_compiler:
            yield Backend.CACHED, _build.find_exact(facts, [cache])
        else:
            yield Backend.CACHED, _build.find_compatible(facts, [cache])

    @staticmethod
    def _facts(spec: OpSpec, compiler: _toolchain.Compiler | None) -> _toolchain.BuildFacts:
        facts = _toolchain.build_facts(
            spec.name, spec.source_paths(), spec.cflags(), compiler, uses_cuda=False
        )
        if spec.kind is OpKind.LIBRARY:
            # no torch headers, no CPU-specific flags of ours: a build survives torch upgrades
            facts = dataclasses.replace(facts, torch="none", python="any", cpu_isa=())
        return facts

    def _load_cpp(self, spec: OpSpec) -> OpImpl:
        compiler = _toolchain.find_compiler()
        have_compiler = compiler.path is not None
        facts = self._facts(spec, compiler if have_compiler else None)
        prebuilt = _build.prebuilt_roots()
        cache = _build.cache_root()
        # An ahead-of-time build is used whenever its runtime facts match (it may come from
        # another machine's compiler); a JIT cache entry only with this exact compiler, or
        # with any compiler when none is available here (so a cache survives a PATH change).
        for backend, lib in self._candidates(facts, prebuilt, cache, have_compiler):
            if lib is not None and (op := self._bind(spec, lib, backend)):
                return op
        missing = missing_build_tools(compiler, needs_ninja=spec.kind is OpKind.CPP)
        if missing:
            return self._fallback(spec, missing)
        try:
            lib = self._compile(spec, facts, compiler, cache)
        except _build.BuildError as exc:
            return self._fallback(
                spec,
                f"the JIT build with {compiler.path} failed:\n{exc}\n(set DS_KERNELS_VERBOSE=1 for the full log)",
            )
        op = self._bind(spec, lib, Backend.JIT)
        if op is None:
            return self._fallback(spec, f"the freshly built {lib} could not be loaded")
        return op

    @staticmethod
    def _compile(
        spec: OpSpec, facts: _toolchain.BuildFacts, compiler: _toolchain.Compiler, root: Path
    ) -> Path:
        sources, flags, ldflags = spec.source_paths(), spec.cflags(), list(spec.extra_ldflags)
        if spec.kind is OpKind.LIBRARY:
            return _build.plain_build(facts, sources, flags, ldflags, compiler, root)
        return _build.jit_build(
            facts, sources, flags, ldflags, compiler, root,
            verbose=os.environ.get("DS_KERNELS_VERBOSE") == "1",
        )  # fmt: skip

    # ------------------------------------------------------------------ AOT and status
    def build(self, name: str, root: Path) -> Path:
        """Ahead-of-time build of a C++ op into `root`; raises BuildError on failure."""
        spec = self.spec(name)
        if spec.kind is OpKind.TRITON:
            raise ValueError(f"op {name!r} is a triton op; only C++ ops are prebuilt")
        compiler = _toolchain.find_compiler()
        missing = missing_build_tools(compiler, needs_ninja=spec.kind is OpKind.CPP)
        if missing:
            raise _build.BuildError(missing)
        facts = self._facts(spec, compiler)
        existing = _build.find_exact(facts, [root])
        if existing is not None:
            return existing
        return self._compile(spec, facts, compiler, root)

    def status(self, name: str) -> OpStatus:
        spec = self.spec(name)
        loaded = self._loaded.get(name)
        loaded_value = loaded.backend.value if loaded is not None else None
        if spec.kind is OpKind.TRITON:
            assert spec.unavailable is not None
            why = spec.unavailable()
            ok = why is None
            return OpStatus(name, spec.summary, ok, ok, loaded_value, why or "Triton")
        why = spec.unavailable() if spec.unavailable is not None else None
        if why is not None:
            return OpStatus(name, spec.summary, False, False, loaded_value, why)
        compiler = _toolchain.find_compiler()
        have = compiler.path is not None
        facts = self._facts(spec, compiler if have else None)
        cands = self._candidates(facts, _build.prebuilt_roots(), _build.cache_root(), have)
        lib = next((found for _, found in cands if found is not None), None)
        missing = missing_build_tools(compiler, needs_ninja=spec.kind is OpKind.CPP)
        compatible = lib is not None or not missing
        detail = str(lib) if lib is not None else (missing or "not built yet (JIT on first use)")
        return OpStatus(name, spec.summary, compatible, lib is not None, loaded_value, detail)


def missing_build_tools(compiler: _toolchain.Compiler, needs_ninja: bool = True) -> str | None:
    """Why a JIT build cannot start here, with the fix; None when it can."""
    if compiler.path is None:
        return (
            f"no C++ compiler: {compiler.requested!r} was not found on PATH "
            "(install g++/clang++ or set CXX to one)"
        )
    if needs_ninja and not _toolchain.ninja_available():
        return "ninja was not found (pip install ninja)"
    return None
