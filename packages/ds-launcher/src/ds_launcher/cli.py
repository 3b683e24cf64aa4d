"""Entry point of the `ds-launch` console script."""

from ds_launcher._cli import main

__all__ = ["main"]
