"""``--autotuning tune|run``: hand the job to the autotuner of ds-profile.

ds-launch does not import ds-profile (the launcher depends on the standard library and torch
only): it starts ``python -m ds_profile.autotune`` as a child process, with the job's world size
and ds-launch's own options as a JSON argv list, and the autotuner launches every trial (and,
for ``run``, the tuned job) through ``python -m ds_launcher`` with those same options.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from ds_launcher._errors import LauncherError


def autotuning_argv(
    mode: str, world_size: int, options: list[str], program: list[str]
) -> list[str]:
    """The autotuner's command line: ``options`` are ds-launch's, without ``--autotuning``."""
    kept = [o for o in options if not (o == "--autotuning" or o.startswith("--autotuning="))]
    return [sys.executable, "-m", "ds_profile.autotune", mode, "--world_size", str(world_size),
            "--launcher_args", json.dumps(kept), "--", *program]  # fmt: skip


def run_autotuning(mode: str, world_size: int, options: list[str], program: list[str]) -> int:
    if not program:
        raise LauncherError(
            "--autotuning needs the training script and its arguments after the options"
        )
    if importlib.util.find_spec("ds_profile") is None:
        raise LauncherError(
            "--autotuning needs the autotuner of ds-profile, which is not installed: "
            "pip install ds-profile (ds-all installs it)"
        )
    return subprocess.run(
        autotuning_argv(mode, world_size, options, program), check=False
    ).returncode
