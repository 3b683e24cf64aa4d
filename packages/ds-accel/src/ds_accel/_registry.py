"""Finding the accelerator: built-ins, third-party plugins, the DS_ACCELERATOR override.

The one piece of module state is the cached default accelerator; ``set_accelerator`` replaces it
and ``reset_accelerator`` clears it (tests use both), so no caller ever holds a stale global.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import metadata

from ds_accel._base import Accelerator
from ds_accel._cpu import CPUAccelerator
from ds_accel._cuda import CUDAAccelerator
from ds_accel._mps import MPSAccelerator

ENV_VAR = "DS_ACCELERATOR"
ENTRY_POINT_GROUP = "ds_accel.accelerators"

_BUILTINS: dict[str, Callable[[], Accelerator]] = {
    "cuda": CUDAAccelerator,
    "cpu": CPUAccelerator,
    "mps": MPSAccelerator,
}

# Detection order when nothing is forced: a real device beats the host.
_DETECT_ORDER = ("cuda", "mps")

_default: Accelerator | None = None


class AcceleratorError(RuntimeError):
    """An accelerator was asked for that does not exist or cannot be used here."""


def _plugins() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_accelerators() -> list[str]:
    """Names ``DS_ACCELERATOR`` accepts: the built-ins and every installed plugin."""
    return sorted(set(_BUILTINS) | set(_plugins()))


def _construct(name: str) -> Accelerator:
    if name in _BUILTINS:
        return _BUILTINS[name]()
    plugins = _plugins()
    if name not in plugins:
        raise AcceleratorError(
            f"unknown accelerator {name!r} (from {ENV_VAR} or set_accelerator); "
            f"known accelerators: {', '.join(known_accelerators())}. Third-party accelerators "
            f"register a class under the entry-point group {ENTRY_POINT_GROUP!r}."
        )
    ep = plugins[name]
    try:
        acc = ep.load()()
    except Exception as e:
        # A plugin's import or constructor error would otherwise surface as a bare traceback
        # from deep inside importlib, naming neither the accelerator nor the package to fix.
        dist = ep.dist.name if getattr(ep, "dist", None) is not None else "unknown distribution"
        raise AcceleratorError(
            f"the accelerator plugin {name!r} (entry point {ep.value!r} of group "
            f"{ENTRY_POINT_GROUP!r}, from {dist}) failed to load: {type(e).__name__}: {e}; "
            f"fix or uninstall {dist}, or pick another of: {', '.join(known_accelerators())}"
        ) from e
    if not isinstance(acc, Accelerator):
        raise AcceleratorError(
            f"the entry point {name!r} of group {ENTRY_POINT_GROUP!r} "
            f"({ep.value}) built a {type(acc).__name__}, not a ds_accel.Accelerator "
            "subclass; make it subclass ds_accel.Accelerator"
        )
    if not acc.name:
        acc.name = name
    return acc


def get_accelerator_by_name(name: str) -> Accelerator:
    """A new accelerator object of the named type (does not change the default)."""
    return _construct(name.strip().lower())


def _detect() -> Accelerator:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        acc = _construct(forced)
        if not acc.is_available():
            raise AcceleratorError(
                f"{ENV_VAR}={forced} but that accelerator is not available in this process "
                f"(torch {_torch_version()}); unset {ENV_VAR} to detect one, or pick another of: "
                f"{', '.join(known_accelerators())}"
            )
        return acc
    for name in _DETECT_ORDER:
        acc = _BUILTINS[name]()
        if acc.is_available():
            return acc
    # Plugins are tried after the built-in devices, before falling back to the host.
    for name in sorted(_plugins()):
        try:
            acc = _construct(name)
        except Exception:  # a broken plugin must not stop CPU users from training
            continue
        if acc.is_available():
            return acc
    return CPUAccelerator()


def _torch_version() -> str:
    import torch

    return torch.__version__


def get_accelerator() -> Accelerator:
    """The accelerator of this process: set_accelerator's, else DS_ACCELERATOR's, else detected
    (cuda, then mps, then installed plugins, then cpu). Cached after the first call."""
    global _default
    if _default is None:
        _default = _detect()
    return _default


def set_accelerator(accelerator: Accelerator | str) -> Accelerator:
    """Replace the cached default accelerator; a name is looked up like DS_ACCELERATOR's."""
    global _default
    if isinstance(accelerator, str):
        accelerator = get_accelerator_by_name(accelerator)
    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            f"set_accelerator takes a ds_accel.Accelerator or a name, not {type(accelerator)}"
        )
    _default = accelerator
    return accelerator


def reset_accelerator() -> None:
    """Forget the cached default so the next get_accelerator() detects again."""
    global _default
    _default = None


def report() -> dict[str, object]:
    """The default accelerator's report plus the names of all known accelerators."""
    rep = dict(get_accelerator().report())
    rep["known_accelerators"] = known_accelerators()
    rep["forced_by_env"] = os.environ.get(ENV_VAR) or None
    return rep
