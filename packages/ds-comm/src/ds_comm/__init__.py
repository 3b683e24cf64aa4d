"""Process groups, collectives with comms logging, 1-bit compressed communication, and the multi-process test harness."""

from ds_comm._version import __version__

__all__ = ["__version__"]
