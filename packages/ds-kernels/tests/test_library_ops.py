"""LIBRARY ops: another package's plain C ABI library built by the host compiler alone (no
ninja, no torch headers), cached, prebuilt, bound with ctypes, falling back with one warning;
and ops discovered through the ``ds_kernels.ops`` entry-point group."""

from __future__ import annotations

import ctypes
import dataclasses
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import ds_kernels
from ds_kernels import _ops, _toolchain
from ds_kernels._registry import Backend, KernelBuildWarning, OpImpl, OpKind, OpRegistry, OpSpec

SOURCE = 'extern "C" int ds_test_answer(int x) { return 6 * x; }\n'


class _Lib(OpImpl):
    def __init__(self, lib: Path | None) -> None:
        self.lib = lib

    def answer(self, x: int) -> int:
        if self.lib is None:
            return 6 * x  # the "fallback"
        return ctypes.CDLL(str(self.lib)).ds_test_answer(x)


def _spec(src: Path, **extra) -> OpSpec:
    return OpSpec(
        name="answer", summary="test library", kind=OpKind.LIBRARY,
        fallback=lambda: _Lib(None), sources=(str(src),), extra_cflags=("-O2",),
        bind=_Lib, fallback_name="Python answer", **extra,
    )  # fmt: skip


@pytest.fixture
def src(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_KERNELS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "answer.cpp"
    path.write_text(SOURCE)
    return path


def test_builds_without_ninja_then_loads_from_the_cache(src, monkeypatch):
    monkeypatch.setattr(_toolchain, "ninja_available", lambda: False)
    reg = OpRegistry()
    reg.register(_spec(src))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = reg.load("answer")
    assert op.backend is Backend.JIT and op.answer(7) == 42
    assert op.lib.name == "libds_answer.so" and "torchnone" in op.lib.parent.name
    again = OpRegistry()
    again.register(_spec(src))
    assert again.load("answer").backend is Backend.CACHED
    st = again.status("answer")
    assert st.compatible and st.built and st.detail == str(op.lib)


def test_prebuilt_library_is_used_without_a_compiler(src, tmp_path, monkeypatch):
    reg = OpRegistry()
    reg.register(_spec(src))
    lib = reg.build("answer", tmp_path / "prebuilt")
    monkeypatch.setenv("DS_KERNELS_PREBUILT", str(tmp_path / "prebuilt"))
    monkeypatch.setenv("DS_KERNELS_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    fresh = OpRegistry()
    fresh.register(_spec(src))
    op = fresh.load("answer")
    assert op.backend is Backend.PREBUILT and op.lib == lib and op.answer(2) == 12


def test_compile_error_unavailable_and_forced_fallback_warn_once(src, monkeypatch):
    src.write_text("#include <no_such_header_here.h>\n" + SOURCE)
    reg = OpRegistry()
    reg.register(_spec(src))
    with pytest.warns(KernelBuildWarning, match="(?s)uses its Python answer .*no_such_header_here"):
        op = reg.load("answer")
    assert op.backend is Backend.FALLBACK and op.answer(1) == 6
    reg.register(_spec(src, unavailable=lambda: "needs a Toaster OS"), replace=True)
    with pytest.warns(KernelBuildWarning, match="needs a Toaster OS"):
        reg.load("answer")
    assert not reg.status("answer").compatible
    monkeypatch.setenv("DS_KERNELS_FORCE_FALLBACK", "answer")
    reg.register(_spec(src), replace=True)
    with pytest.warns(KernelBuildWarning, match="DS_KERNELS_FORCE_FALLBACK"):
        assert reg.load("answer").backend is Backend.FALLBACK
    with pytest.raises(ValueError, match="already registered"):
        reg.register(_spec(src))
    with pytest.raises(ValueError, match="needs bind="):
        reg.register(OpSpec("x", "x", OpKind.LIBRARY, fallback=lambda: _Lib(None)))


def test_ops_of_other_packages_come_from_entry_points(src, monkeypatch):
    ep = metadata.EntryPoint(name="answer", value="tests_answer_op:SPEC", group=_ops.OPS_GROUP)
    broken = metadata.EntryPoint(name="bad", value="no_such_module_x:SPEC", group=_ops.OPS_GROUP)
    spec = _spec(src)
    monkeypatch.setitem(__import__("sys").modules, "tests_answer_op", type("M", (), {"SPEC": spec}))
    monkeypatch.setattr(_ops.metadata, "entry_points",
                        lambda group: [ep, broken] if group == _ops.OPS_GROUP else [])  # fmt: skip
    _ops.set_default_registry(None)
    try:
        with pytest.warns(KernelBuildWarning, match="op entry point 'bad'"):
            names = _ops.default_registry().names()
        assert "answer" in names and "cpu_optim" in names
        assert ds_kernels.load("answer").answer(3) == 18
        # register_op replaces an entry point's spec (a package registering at run time)
        ds_kernels.register_op(dataclasses.replace(_spec(src), summary="replaced"))
        assert ds_kernels.op_status("answer").summary == "replaced"
    finally:
        _ops.set_default_registry(None)
