"""Ahead-of-time builds: compile every C++ op that can be built here into one directory.

Used by ``python -m ds_kernels.build`` and by the wheel build hook when ``DS_BUILD_OPS=1``;
`load()` then finds the result (prebuilt roots are searched before the JIT cache).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ds_kernels._build import BuildError, package_prebuilt_dir
from ds_kernels._ops import OWN_OPS, default_registry
from ds_kernels._registry import OpKind


@dataclasses.dataclass(frozen=True)
class AotResult:
    op: str
    library: Path | None  # None when the build failed
    error: str | None


def build_all(
    dest: Path | None = None, ops: list[str] | None = None, include_plugins: bool = True
) -> list[AotResult]:
    """Build the C++ ops (all, or those named) into `dest` (default: the package's
    ``_prebuilt/`` directory); ``include_plugins=False`` leaves out other packages' ops (the
    wheel hook: ds-kernels' wheel ships only its own). Never raises for a failed op: the result
    carries the error."""
    reg = default_registry()
    root = Path(dest) if dest is not None else package_prebuilt_dir()
    names = ops or [
        n for n in reg.names()
        if reg.spec(n).kind is not OpKind.TRITON and (include_plugins or n in OWN_OPS)
    ]  # fmt: skip
    results = []
    for name in names:
        try:
            results.append(AotResult(name, reg.build(name, root), None))
        except (BuildError, ValueError) as exc:
            results.append(AotResult(name, None, str(exc)))
    return results
