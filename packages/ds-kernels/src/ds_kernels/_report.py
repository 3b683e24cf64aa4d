"""``ds-report``: accelerator, torch, compilers, CPU ISA, and per op what `load()` would do.

Nothing is built unless ``--build`` is given (then every op is loaded, building as needed).
Other packages add sections through the entry-point group ``ds_report.sections``: each entry
is a callable returning a JSON-able dict, printed under a header naming the entry and the
distribution that registered it, one labelled line per value (nested dicts and lists become
indented labelled lines, never a Python dict dump).
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


def _sections() -> tuple[dict[str, Any], dict[str, str]]:
    """Each section's dict, and the distribution (package) that registered it."""
    out: dict[str, Any] = {}
    packages: dict[str, str] = {}
    for ep in _section_entry_points():
        dist = getattr(ep, "dist", None)
        packages[ep.name] = dist.name if dist is not None else "unknown package"
        try:
            out[ep.name] = ep.load()()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the rest
            out[ep.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out, packages


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
    # after the ops: a section may register more ops (entry points) in the registry
    sections, section_packages = _sections()
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
        "sections": sections,
        "section_packages": section_packages,
    }


_LABEL_WIDTH = 20


def _scalar(v: Any) -> str:
    if v is True:
        return "yes"
    if v is False:
        return "no"
    if v is None:
        return "-"
    return str(v)


def _labelled(key: str, value: Any, indent: str = "") -> list[str]:
    """``key ..... value`` lines: a small flat dict is one line of ``k: v`` pairs, a larger or
    nested dict (or a list of dicts) opens an indented block under its key, a list of scalars is
    one comma-separated line."""
    label = f"{indent}{key}"
    if (
        isinstance(value, dict)
        and 0 < len(value) <= 4
        and not any(isinstance(v, (dict, list, tuple)) for v in value.values())
    ):
        # a small flat record stays on one line: "installed: yes, version: 0.1.3"
        text = ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items())
        return [f"{label} {'.' * max(2, _LABEL_WIDTH - len(label))} {text}"]
    if isinstance(value, dict):
        if not value:
            return [f"{label} {'.' * max(2, _LABEL_WIDTH - len(label))} (none)"]
        lines = [label]
        for k, v in value.items():
            lines += _labelled(str(k), v, indent + "  ")
        return lines
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        lines = [label]
        for i, v in enumerate(value):
            lines += _labelled(f"[{i}]", v, indent + "  ")
        return lines
    if isinstance(value, (list, tuple)):
        text = ", ".join(_scalar(v) for v in value) or "(none)"
    else:
        text = _scalar(value)
    return [f"{label} {'.' * max(2, _LABEL_WIDTH - len(label))} {text}"]


def format_section(name: str, package: str, section: Any) -> list[str]:
    """One ``ds_report.sections`` entry as text: a header naming the section and its package,
    then one labelled line per value."""
    lines = [f"[{name}] from {package}"]
    if isinstance(section, dict):
        for k, v in section.items():
            lines += _labelled(str(k), v)
    else:
        lines += _labelled("value", section)
    return lines


def format_report(rep: dict[str, Any]) -> str:
    acc = rep["accelerator"]
    lines = [
        "ds-report",
        "-" * 60,
        "[kernels] from ds-kernels: toolchain and ops",
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
    packages = rep.get("section_packages", {})
    for name, section in rep.get("sections", {}).items():
        lines.append("-" * 60)
        lines += format_section(name, packages.get(name, "unknown package"), section)
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
