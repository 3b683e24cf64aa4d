"""Error types. Every message names the file, line, host or flag at fault and says how to fix it."""

from __future__ import annotations


class LauncherError(Exception):
    """Bad launcher input (flags, hostfile, env file) or an environment the launcher cannot use.

    The CLI prints the message and exits with status 2, like argparse does for bad flags.
    """


class HostfileError(LauncherError, ValueError):
    """A hostfile, or an --include/--exclude filter, that cannot be used."""


class EnvFileError(LauncherError, ValueError):
    """An env file (`.ds_env`, `.deepspeed_env`, `--env_file`) with a line that is not VAR=VALUE."""
