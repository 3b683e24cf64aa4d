"""Sharded, reshardable checkpoints: safetensors + JSON manifest, atomic commit."""

from ds_ckpt._version import __version__

__all__ = ["__version__"]
