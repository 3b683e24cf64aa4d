"""``ds-report``: accelerator, torch, compilers, CPU ISA, and per op what `load()` would do.

Nothing is built unless ``--build`` is given (then every op is loaded, building as needed).
Other packages add sections through the entry-point group ``ds_report.sections``: each entry
is a callable returning a JSON-able dict, printed under the entry's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from typing import Any

import torch

from ds_kernels import _build, _toolchain
from ds_kernels._ops import default_registry
from ds_kernels._version import __version__


def _accelerator() -> dict[str, Any]:
    try:
        from ds_accel import get_accelerator

        return dict(get_accelerator().report())
    except Exception as exc:  # noqa: BLE001 - the report must print whatever it can
        return {"error": f"{type(exc).__name__}: {exc}"}


def _nvcc() -> str | None:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001
        return None
    return CUDA_HOME


SECTIONS_GROUP = "ds_report.sections"


def _section_entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=SECTIONS_GROUP), key=lambda ep: ep.name)


def _sections() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ep in _section_entry_points():
        try:
            out[ep.name] = ep.load()()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the rest
            out[ep.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def report(build: bool = False) -> dict[str, Any]:
    """Facts as a dict (what ``ds-report --json`` prints)."""
    reg = default_registry()
    if build:
        for name in reg.names():
            reg.load(name)
    compiler = _toolchain.find_compiler()
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    ops = []
    for name in reg.names():
        st = reg.status(name)
        if st.loaded is not None:
            state = st.loaded
        elif st.built:
            state = "built"
        elif st.compatible:
            state = "compatible (JIT on first use)"
        else:
            state = "fallback"
        ops.append(
            {
                "op": name,
                "summary": st.summary,
                "compatible": st.compatible,
                "built": st.built,
                "state": state,
                "detail": st.detail,
            }
        )
    return {
        "ds_kernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "accelerator": _accelerator(),
        "cxx": {
            "requested": compiler.requested,
            "path": compiler.path,
            "version": compiler.version,
        },
        "ninja": _toolchain.ninja_available(),
        "cuda_home": _nvcc(),
        "triton": triton_version,
        "cpu_isa": list(_toolchain.cpu_isa()),
        "cxx_flags": _toolchain.host_cxx_flags(),
        "cache_dir": str(_build.cache_root()),
        "prebuilt_dirs": [str(p) for p in _build.prebuilt_roots()],
        "ops": ops,
        "sections": _sections(),
    }


def format_report(rep: dict[str, Any]) -> str:
    acc = rep["accelerator"]
    lines = [
        "ds-kernels report",
        "-" * 60,
        f"ds_kernels ........ {rep['ds_kernels']}",
        f"torch ............. {rep['torch']} (cuda {rep['torch_cuda']})",
        f"accelerator ....... {acc.get('accelerator', acc.get('error'))} "
        f"(available: {acc.get('available')}, devices: {acc.get('device_count')}, "
        f"comm: {acc.get('communication_backend')})",
        f"C++ compiler ...... {rep['cxx']['path'] or 'NOT FOUND (' + rep['cxx']['requested'] + ')'}"
        f"{'  ' + rep['cxx']['version'] if rep['cxx']['version'] else ''}",
        f"ninja ............. {'yes' if rep['ninja'] else 'NOT FOUND (pip install ninja)'}",
        f"CUDA_HOME ......... {rep['cuda_home']}",
        f"triton ............ {rep['triton'] or 'not installed'}",
        f"CPU ISA ........... {' '.join(rep['cpu_isa']) or 'unknown'}",
        f"C++ flags ......... {' '.join(rep['cxx_flags'])}",
        f"JIT cache ......... {rep['cache_dir']}",
        "-" * 60,
        f"{'op':<14}{'compatible':<12}{'built':<8}state",
    ]
    for op in rep["ops"]:
        lines.append(
            f"{op['op']:<14}{'yes' if op['compatible'] else 'NO':<12}"
            f"{'yes' if op['built'] else 'no':<8}{op['state']}"
        )
        lines.append(f"{'':<14}{op['detail']}")
    for name, section in rep.get("sections", {}).items():
        lines += ["-" * 60, f"[{name}]"]
        if isinstance(section, dict):
            lines += [f"{k} {'.' * max(2, 18 - len(str(k)))} {v}" for k, v in section.items()]
        else:
            lines.append(str(section))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds-report", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--build", action="store_true", help="load (and build) every op first")
    args = parser.parse_args(argv)
    rep = report(build=args.build)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
