"""The ``packages`` section of ``ds-report``: every installed ds-* package, its version, and
whether it imports (registered in the entry-point group ``ds_report.sections``)."""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

PACKAGES = ("ds-accel", "ds-comm", "ds-kernels", "ds-zero", "ds-offload", "ds-pipe", "ds-moe",
            "ds-launcher", "ds-ckpt", "ds-all")  # fmt: skip


def _installed_ds_packages() -> list[str]:
    """The known packages first, then any other installed ``ds-*`` distribution."""
    others = sorted(
        {d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"]} - set(PACKAGES)
    )
    return list(PACKAGES) + [n for n in others if n.startswith("ds-")]


def packages_report() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dist in _installed_ds_packages():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = {"installed": False}
            continue
        entry: dict[str, Any] = {"installed": True, "version": version}
        try:
            importlib.import_module(dist.replace("-", "_"))
            entry["imports"] = True
        except Exception as e:  # noqa: BLE001 - the report shows what is broken, it never raises
            entry["imports"] = False
            entry["error"] = f"{type(e).__name__}: {e}"
        out[dist] = entry
    return out
