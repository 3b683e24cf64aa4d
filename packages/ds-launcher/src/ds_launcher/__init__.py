"""The ds-launch CLI: hostfiles, local/ssh/pdsh/MPI/SLURM runners, fail-fast, restarts.

Most users only run `ds-launch`; the names below are for tools that read the same hostfiles and
env files, or that start the launcher in-process (`main(argv)` returns the exit code).
"""

from ds_launcher._cli import main
from ds_launcher._envfile import parse_env_file, read_env_file
from ds_launcher._errors import EnvFileError, HostfileError, LauncherError
from ds_launcher._hostfile import format_hostfile, parse_hostfile, read_hostfile
from ds_launcher._resources import select_resources
from ds_launcher._version import __version__
from ds_launcher._watchdog import HEARTBEAT_ENV, heartbeat

__all__ = [
    "HEARTBEAT_ENV",
    "EnvFileError",
    "HostfileError",
    "LauncherError",
    "__version__",
    "format_hostfile",
    "heartbeat",
    "main",
    "parse_env_file",
    "parse_hostfile",
    "read_env_file",
    "read_hostfile",
    "select_resources",
]
