"""Refuse to shadow a real DeepSpeed silently.

Both distributions are called ``deepspeed``, so pip swaps one for the other inside one
environment; they meet when they come from different places: a DeepSpeed in site-packages and
this package on PYTHONPATH (or in the user site), or two ``deepspeed`` dist-infos. Then one
``import deepspeed`` hides the other, and which one runs depends on path order."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from pathlib import Path

from deepspeed._version import __version__

#: set to 1 to import this package anyway (a warning instead of ImportError)
ALLOW_ENV = "DS_DEEPSPEED_ALLOW_SHADOW"
# Every release of this package carries a local version label starting so. A distribution with it
# is this package, whatever its release: an editable install keeps the metadata of the release it
# was installed at while its source moves on, and is not another DeepSpeed.
_LABEL_PREFIX = __version__.partition("+")[2].partition(".")[0] + "."  # "dsall."


def foreign_installations(package_dir: Path, path: list[str] | None = None) -> list[str]:
    """Where another ``deepspeed`` lives: packages on ``path`` (default ``sys.path``) other
    than ``package_dir``, and ``deepspeed`` distributions whose version lacks our label
    (``+dsall.``, any release)."""
    here = package_dir.resolve()
    found: list[str] = []
    for entry in sys.path if path is None else path:
        candidate = Path(entry or ".") / "deepspeed" / "__init__.py"
        try:
            if candidate.is_file() and candidate.parent.resolve() != here:
                found.append(f"package {candidate.parent}")
        except OSError:
            continue
    for dist in importlib.metadata.distributions(name="deepspeed", path=path or sys.path):
        if not dist.version.partition("+")[2].startswith(_LABEL_PREFIX):
            where = getattr(dist, "_path", None)
            found.append(
                f"distribution deepspeed {dist.version}" + (f" ({where})" if where else "")
            )
    return sorted(set(found))


def check(package_dir: Path) -> None:
    """ImportError (or, with DS_DEEPSPEED_ALLOW_SHADOW=1, a warning) when another DeepSpeed
    is installed where it could be imported instead of this package or alongside it."""
    found = foreign_installations(package_dir)
    if not found:
        return
    message = (
        f"deepspeed {__version__} (ds-all's DeepSpeed API, {package_dir}) would shadow or be "
        f"shadowed by another DeepSpeed: {'; '.join(found)}. Keep one: `pip uninstall deepspeed` "
        "and reinstall the one you want, or remove the other from PYTHONPATH/sys.path; set "
        f"{ALLOW_ENV}=1 to import this one anyway"
    )
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(message)
