"""ZeRO data parallelism, stages 0-3, mixed precision, loss scaling, clipping."""

from ds_zero._version import __version__

__all__ = ["__version__"]
