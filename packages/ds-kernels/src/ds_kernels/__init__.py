"""Op registry with JIT/AOT builds and pure-PyTorch fallbacks; CPU and fused GPU optimizers."""

from ds_kernels._version import __version__

__all__ = ["__version__"]
