"""``deepspeed.launcher.runner``: the ``deepspeed`` command (ds_launcher's ``ds-launch``) and the
env-file name clients write for multi-node runs."""

from __future__ import annotations

import os

from ds_launcher import main

# Read once at import, as DeepSpeed does: DS_ENV_FILE renames the file ds-launch exports from
# the home and working directories to every rank.
DEEPSPEED_ENVIRONMENT_NAME = os.getenv("DS_ENV_FILE", ".deepspeed_env")
DEEPSPEED_ENVIRONMENT_PATHS = (os.path.expanduser("~"), ".")

__all__ = ["DEEPSPEED_ENVIRONMENT_NAME", "DEEPSPEED_ENVIRONMENT_PATHS", "main"]
