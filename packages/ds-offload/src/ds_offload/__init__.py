"""Optimizer and parameter offload to CPU and NVMe over an async IO engine."""

from ds_offload._version import __version__

__all__ = ["__version__"]
