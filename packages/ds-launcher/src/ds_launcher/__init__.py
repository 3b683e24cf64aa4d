"""The ds-launch CLI: hostfiles, local/ssh/pdsh/MPI/SLURM runners, fail-fast, restarts."""

from ds_launcher._version import __version__

__all__ = ["__version__"]
