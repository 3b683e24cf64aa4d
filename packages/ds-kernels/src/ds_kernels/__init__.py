"""Op registry with JIT/AOT builds and pure-PyTorch fallbacks; CPU and fused GPU optimizers.

>>> import ds_kernels
>>> op = ds_kernels.load("cpu_optim")      # compiled, cached, or the fallback (warns once)
>>> opt = ds_kernels.CPUAdam(model.parameters(), lr=1e-3)
"""

from ds_kernels._aot import AotResult, build_all
from ds_kernels._cpu_optimizers import CPUAdagrad, CPUAdam, CPULion
from ds_kernels._fused_optimizers import FusedAdam, FusedLamb, FusedLion
from ds_kernels._ops import load, register_op
from ds_kernels._quantize import dequantize_blockwise, quantize_blockwise
from ds_kernels._registry import Backend, KernelBuildWarning, OpImpl, OpKind, OpSpec, OpStatus
from ds_kernels._report import format_report, report
from ds_kernels._version import __version__

__all__ = [
    "AotResult",
    "Backend",
    "CPUAdagrad",
    "CPUAdam",
    "CPULion",
    "FusedAdam",
    "FusedLamb",
    "FusedLion",
    "KernelBuildWarning",
    "OpImpl",
    "OpKind",
    "OpSpec",
    "OpStatus",
    "__version__",
    "build_all",
    "dequantize_blockwise",
    "format_report",
    "load",
    "op_status",
    "quantize_blockwise",
    "register_op",
    "report",
]


def op_status(name: str) -> OpStatus:
    """What `load(name)` would do here (compatible / built / loaded), without building."""
    from ds_kernels._ops import default_registry

    return default_registry().status(name)
