"""Accelerator abstraction (CUDA/ROCm, CPU, MPS) with a plugin registry."""

from ds_accel._version import __version__

__all__ = ["__version__"]
