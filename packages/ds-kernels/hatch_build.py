"""Wheel build hook: with DS_BUILD_OPS=1, compile every C++ op and ship it in the wheel.

Needs torch and a compiler in the build environment, so use it as
``DS_BUILD_OPS=1 pip install --no-build-isolation ./packages/ds-kernels``. Without the switch
this hook does nothing and the ops are JIT-built on first use.

A regular wheel gets builds made in a temporary directory, placed at
``ds_kernels/_prebuilt/<build>/`` inside the wheel: the source tree is left as it was, so a
wheel never ships a stale build left there by an earlier run, and an editable install of the
same tree does not start using a library it did not ask for. An editable install
(``pip install -e``) imports from ``src/``, so there the builds go to
``src/ds_kernels/_prebuilt/``, where `load()` looks.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SWITCH = "DS_BUILD_OPS"
# What a build directory holds that load() needs; not ninja's objects and logs.
_SHIPPED = ("*.so", "manifest.json")


class CustomBuildHook(BuildHookInterface):
    _tmp: str | None = None

    def initialize(self, version: str, build_data: dict) -> None:
        if os.environ.get(SWITCH) != "1":
            return
        src = Path(self.root) / "src"
        sys.path.insert(0, str(src))
        try:
            from ds_kernels._aot import build_all
        except ImportError as exc:
            raise RuntimeError(
                f"{SWITCH}=1 needs torch in the build environment: "
                "pip install --no-build-isolation ..."
            ) from exc
        if version == "editable":
            dest = src / "ds_kernels" / "_prebuilt"
        else:
            self._tmp = tempfile.mkdtemp(prefix="ds_kernels_aot_")
            dest = Path(self._tmp)
        failed = [r for r in build_all(dest, include_plugins=False) if r.error is not None]
        if failed:
            names = ", ".join(f"{r.op}: {r.error}" for r in failed)
            raise RuntimeError(f"{SWITCH}=1 but these ops failed to build: {names}")
        if version != "editable":
            for build_dir in sorted(p for p in dest.iterdir() if (p / "manifest.json").is_file()):
                for pattern in _SHIPPED:
                    for f in build_dir.glob(pattern):
                        target = f"ds_kernels/_prebuilt/{build_dir.name}/{f.name}"
                        build_data["force_include"][str(f)] = target
        # The wheel now holds a native library for this platform.
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
