"""DeepSpeed-compatible config and initialize() engine assembling every ds-* package."""

from ds_all._version import __version__

__all__ = ["__version__"]
