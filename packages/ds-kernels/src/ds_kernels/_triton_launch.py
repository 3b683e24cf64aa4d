"""Launching a ``@triton.jit`` kernel with less host time per call than ``kernel[grid](...)``.

Each call of a JIT kernel binds its arguments to the signature, computes their specialization
(dtype and 16-byte alignment of each pointer, divisibility of each integer), turns that and the
options into a cache key, looks the compiled kernel up, then calls its launcher. On an H100
host that was about 20 µs a call (Triton 3.6), where DeepSpeed's C++ quantizer spends 7-13 µs
in all: for small buckets the host, not the GPU, sets the pace.

``DirectLauncher`` keeps what the JIT path recomputes: a ``LaunchPlan`` (grid, options and
constexpr values of one shape, built once by its caller) and, per specialization, the compiled
kernel the first JIT launch returned. Later calls with the same specialization call that
compiled kernel's launcher, as the JIT path itself finally does. The specialization key here is
a superset of Triton's: for each tensor its dtype and whether its address is a multiple of 16,
for each integer whether it is 1, a multiple of 16, and which of int32, int64 and uint64 holds
it, plus the current device, the constexprs and the options. Arguments that Triton would
compile differently always get different keys here, so a cached kernel is only ever launched
with arguments it was compiled for.

The call into the compiled kernel follows Triton's own (``JITFunction.run``): the grid, the
stream, the function handle, the packed metadata, the launch metadata and the two launch
hooks, then every argument, constexprs included. That convention is checked against the
Triton versions in ``DIRECT_VERSIONS``; any other version, Triton's interpreter, and any call
made while a launch hook is installed (a profiler such as Proton) take the JIT path. With no
hook installed the launch metadata and the hooks are passed as None, so the launcher skips
them (the JIT path builds the metadata whenever the hook object exists, even an empty chain).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: Triton versions (major, minor), first and last, whose JIT launch passes the arguments to the
#: compiled kernel's launcher as ``DirectLauncher`` does
DIRECT_VERSIONS = ((3, 6), (3, 9))

#: compiled kernels kept per launcher: a handful of dtypes and alignments per kernel in
#: practice; past this many the cache starts over rather than grow without bound
_MAX_CACHED = 256


def direct_launch_supported(triton_module: Any) -> bool:
    """Whether this Triton's JIT launch convention is one ``DirectLauncher`` follows."""
    try:
        version = tuple(int(p) for p in triton_module.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return DIRECT_VERSIONS[0] <= version <= DIRECT_VERSIONS[1] and hasattr(triton_module, "knobs")


@dataclass(frozen=True)
class LaunchPlan:
    """One launch shape of a kernel: the grid, and the keyword arguments of a JIT launch
    (constexprs and options such as ``num_warps``). ``tail`` is the constexpr values in the
    kernel's parameter order, which follow its runtime arguments; ``key`` stands for all of it
    in the specialization key."""

    grid: tuple[int, int, int]
    kwargs: Mapping[str, Any]
    tail: tuple[Any, ...]
    key: tuple[Any, ...] = field(repr=False)

    @classmethod
    def build(cls, kernel: Any, grid: tuple[int, ...], kwargs: Mapping[str, Any]) -> LaunchPlan:
        """The plan of ``kernel[grid](*args, **kwargs)``: every constexpr parameter of the
        kernel must be in ``kwargs`` and come after all its runtime parameters."""
        names = list(kernel.arg_names)
        constexprs = [names[i] for i in sorted(_constexpr_indices(kernel, kwargs))]
        if names[len(names) - len(constexprs) :] != constexprs:
            raise ValueError(f"{names}: the constexpr parameters must come last")
        missing = [name for name in constexprs if name not in kwargs]
        if missing:
            raise ValueError(f"launch plan: constexpr {missing} not given")
        full = (tuple(grid) + (1, 1))[:3]
        kw = dict(kwargs)
        return cls(full, kw, tuple(kw[name] for name in constexprs), tuple(sorted(kw.items())))


def _constexpr_indices(kernel: Any, kwargs: Mapping[str, Any]) -> list[int]:
    """Positions of a kernel's constexpr parameters: ``JITFunction.constexprs`` holds them;
    Triton's interpreter (whose kernels are never launched directly) has no such list, so there
    they are the parameters given by keyword."""
    names = list(kernel.arg_names)
    constexprs = getattr(kernel, "constexprs", None)
    if constexprs is None:
        return [i for i, name in enumerate(names) if name in kwargs]
    return [c if isinstance(c, int) else names.index(c) for c in constexprs]


def _spec(arg: Any) -> Any:
    """What of one runtime argument Triton may specialize on, or more."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg), arg  # never met by the quantizer; keyed by value, so always safe
    width = 0 if -(2**31) <= arg < 2**31 else (1 if arg < 2**63 else 2)
    return arg == 1, arg % 16 == 0, width


def _idle(hook: Any) -> bool:
    """Whether a launch hook of Triton's runtime knobs does nothing: None, or (Triton 3.6 on)
    a ``HookChain`` with no hook added."""
    return hook is None or getattr(hook, "calls", None) == []


class DirectLauncher:
    """Launches one JIT kernel by plans, through its compiled kernel when it can (module
    docstring). ``direct`` False always takes the JIT path (``kernel[grid](...)``).

    ``direct_launches`` and ``jit_launches`` count the calls of each path (tests check that the
    direct path really runs where it should). ``driver`` and ``knobs`` are Triton's active
    driver (current device and stream) and runtime knobs (the launch hooks); by default they
    are looked up at the first direct launch."""

    def __init__(self, kernel: Any, direct: bool, driver: Any = None, knobs: Any = None):
        self.kernel = kernel
        self.direct = direct
        self.direct_launches = 0
        self.jit_launches = 0
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._driver = driver
        self._knobs = knobs

    def _bind_runtime(self) -> None:
        import triton

        if self._driver is None:
            self._driver = triton.runtime.driver.active
        if self._knobs is None:
            self._knobs = triton.knobs.runtime

    def __call__(self, plan: LaunchPlan, *args: Any) -> Any:
        """Launch with runtime arguments ``args`` (in parameter order) and ``plan``; returns
        the compiled kernel (None under Triton's interpreter)."""
        key = None
        if self.direct:
            if self._driver is None or self._knobs is None:
                self._bind_runtime()
            knobs = self._knobs
            if _idle(knobs.launch_enter_hook) and _idle(knobs.launch_exit_hook):
                device = self._driver.get_current_device()
                key = (plan.key, device, *map(_spec, args))
                compiled = self._compiled.get(key)
                if compiled is not None:
                    g = plan.grid
                    compiled.run(
                        g[0], g[1], g[2], self._driver.get_current_stream(device),
                        compiled.function, compiled.packed_metadata, None, None, None,
                        *args, *plan.tail,
                    )  # fmt: skip
                    self.direct_launches += 1
                    return compiled
        compiled = self.kernel[plan.grid](*args, **plan.kwargs)
        self.jit_launches += 1
        if key is not None and all(
            hasattr(compiled, a) for a in ("run", "function", "packed_metadata")
        ):
            if len(self._compiled) >= _MAX_CACHED:
                self._compiled.clear()
            self._compiled[key] = compiled
        return compiled
