"""The ops this package ships, and the process-wide default registry (tests may replace it)."""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path

from ds_kernels._registry import KernelBuildWarning, OpImpl, OpKind, OpRegistry, OpSpec


def _bind_cpu_optim(lib: Path) -> OpImpl:
    from ds_kernels._cpu_optim_op import CompiledCpuOptim

    return CompiledCpuOptim(lib)


def _cpu_optim_fallback() -> OpImpl:
    from ds_kernels._cpu_optim_op import TorchCpuOptim

    return TorchCpuOptim()


def _fused_unavailable() -> str | None:
    from ds_kernels._fused_op import triton_unavailable

    return triton_unavailable()


def _fused_native() -> OpImpl:
    from ds_kernels._fused_op import TritonFusedOptim

    return TritonFusedOptim()


def _fused_fallback() -> OpImpl:
    from ds_kernels._fused_op import TorchFusedOptim

    return TorchFusedOptim()


CPU_OPTIM = OpSpec(
    name="cpu_optim",
    summary="CPUAdam / CPUAdagrad / CPULion steps (C++, OpenMP, SIMD)",
    kind=OpKind.CPP,
    fallback=_cpu_optim_fallback,
    sources=("cpu_optim.cpp",),
    # -fno-math-errno lets sqrt vectorise (no errno side effect to preserve).
    extra_cflags=("-fno-math-errno", "-ffp-contract=off"),
    extra_ldflags=("-fopenmp",),
    bind=_bind_cpu_optim,
)

FUSED_OPTIM = OpSpec(
    name="fused_optim",
    summary="FusedAdam / FusedLamb / FusedLion multi-tensor steps (Triton)",
    kind=OpKind.TRITON,
    fallback=_fused_fallback,
    unavailable=_fused_unavailable,
    native=_fused_native,
)


def _quant_native() -> OpImpl:
    from ds_kernels._quant_op import TritonQuantizer

    return TritonQuantizer()


def _quant_fallback() -> OpImpl:
    from ds_kernels._quant_op import TorchQuantizer

    return TorchQuantizer()


QUANTIZER = OpSpec(
    name="quantizer",
    summary="block-wise symmetric int8/int4 quantize and dequantize (Triton)",
    kind=OpKind.TRITON,
    fallback=_quant_fallback,
    unavailable=_fused_unavailable,  # the same condition: Triton plus a CUDA device
    native=_quant_native,
)


OPS_GROUP = "ds_kernels.ops"
OWN_OPS = frozenset(
    {CPU_OPTIM.name, FUSED_OPTIM.name, QUANTIZER.name}
)  # the rest come from other packages


def _make_default() -> OpRegistry:
    reg = OpRegistry()
    reg.register(CPU_OPTIM)
    reg.register(FUSED_OPTIM)
    reg.register(QUANTIZER)
    # Other packages' ops (e.g. ds-offload's async IO library) through the entry-point group
    # ``ds_kernels.ops``: each names an OpSpec, so ds-report lists them and load() builds them
    # with the same cache, prebuilt roots and fallback rules, without importing those packages
    # until the op is loaded.
    for ep in sorted(metadata.entry_points(group=OPS_GROUP), key=lambda e: e.name):
        try:
            spec = ep.load()
            reg.register(spec() if callable(spec) else spec)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not hide the other ops
            warnings.warn(
                f"ds_kernels: op entry point {ep.name!r} ({ep.value}) failed to load: {exc}",
                KernelBuildWarning,
                stacklevel=2,
            )
    return reg


_default: OpRegistry | None = None


def default_registry() -> OpRegistry:
    global _default
    if _default is None:
        _default = _make_default()
    return _default


def set_default_registry(registry: OpRegistry | None) -> None:
    """Replace (or with None, reset) the default registry; for tests."""
    global _default
    _default = registry


def register_op(spec: OpSpec) -> None:
    """Add another package's op to the default registry at run time (an entry point in the
    group ``ds_kernels.ops`` does the same at first use, and is what ds-report sees).
    Registering a spec under a name the registry has from an entry point replaces it."""
    default_registry().register(spec, replace=True)


def load(name: str) -> OpImpl:
    """Load op `name`: a compiled/native build, or its pure-PyTorch fallback (never raises for
    a missing compiler, ninja, header or device; warns once per op instead)."""
    return default_registry().load(name)
