"""Wheel build hook: with DS_BUILD_OPS=1, compile every C++ op into src/ds_kernels/_prebuilt/.

Needs torch and a compiler in the build environment, so use it as
``DS_BUILD_OPS=1 pip install --no-build-isolation ./packages/ds-kernels``. Without the switch
this hook does nothing and the ops are JIT-built on first use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if os.environ.get("DS_BUILD_OPS") != "1":
            return
        src = Path(self.root) / "src"
        sys.path.insert(0, str(src))
        try:
            from ds_kernels._aot import build_all
        except ImportError as exc:
            raise RuntimeError(
                "DS_BUILD_OPS=1 needs torch in the build environment: "
                "pip install --no-build-isolation ..."
            ) from exc
        dest = src / "ds_kernels" / "_prebuilt"
        failed = [r for r in build_all(dest) if r.error is not None]
        if failed:
            names = ", ".join(f"{r.op}: {r.error}" for r in failed)
            raise RuntimeError(f"DS_BUILD_OPS=1 but these ops failed to build: {names}")
        # The libraries and their manifests; not ninja's objects and logs.
        build_data["artifacts"].extend(
            ["src/ds_kernels/_prebuilt/**/*.so", "src/ds_kernels/_prebuilt/**/manifest.json"]
        )
        # The wheel now holds a native library for this platform.
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
