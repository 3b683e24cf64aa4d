"""Mixture-of-experts layer with top-k gating and expert parallelism."""

from ds_moe._version import __version__

__all__ = ["__version__"]
