"""Op registry with JIT/AOT builds and pure-PyTorch fallbacks; CPU and fused GPU optimizers.

>>> import ds_kernels
>>> op = ds_kernels.load("cpu_optim")      # compiled, cached, or the fallback (warns once)
>>> opt = ds_kernels.CPUAdam(model.parameters(), lr=1e-3)
"""

from ds_kernels._cpu_optimizers import CPUAdagrad, CPUAdam, CPULion
from ds_kernels._fused_optimizers import FusedAdam, FusedLamb, FusedLion
from ds_kernels._ops import load
from ds_kernels._registry import Backend, KernelBuildWarning
from ds_kernels._version import __version__

__all__ = [
    "Backend",
    "CPUAdagrad",
    "CPUAdam",
    "CPULion",
    "FusedAdam",
    "FusedLamb",
    "FusedLion",
    "KernelBuildWarning",
    "__version__",
    "load",
]
