"""Output directories named in the config, checked when initialize() starts: a directory that
cannot be created or written is a ConfigError naming the key, instead of a FileNotFoundError or
NotADirectoryError from deep inside a monitor or a checkpoint save many steps later."""

from __future__ import annotations

import os
from pathlib import Path

from ds_all._config_base import ConfigError


def _nearest_existing(path: Path) -> Path:
    cur = path
    while not os.path.lexists(cur):
        if cur.parent == cur:
            break
        cur = cur.parent
    return cur


def check_output_dir(path: str | os.PathLike[str], key: str) -> Path:
    """``path`` is a directory this process can create (or already has) and write into.
    Returns it; raises ConfigError naming ``key`` with what is in the way."""
    target = Path(path).expanduser().absolute()
    found = _nearest_existing(target)
    if found == target:
        if not target.is_dir():
            raise ConfigError(
                f"{key}: {str(path)!r} exists and is not a directory; point {key} at a directory "
                "(it is created if missing)"
            )
    elif not found.is_dir():
        what = "a broken symbolic link" if found.is_symlink() else "a file, not a directory"
        raise ConfigError(
            f"{key}: {str(path)!r} cannot be created because {str(found)!r} is {what}; "
            f"choose another {key}"
        )
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}: {str(path)!r} is not writable by this process (no write permission in "
            f"{str(found)!r}); choose a directory you can write to"
        )
    return target


def make_output_dir(path: str | os.PathLike[str], key: str) -> Path:
    """Check ``path`` as :func:`check_output_dir` does and create it."""
    target = check_output_dir(path, key)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create {str(path)!r}: {e.strerror or e}") from None
    return target
