"""The op registry: JIT build and cache, ahead-of-time builds, and fallbacks that never crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import ds_kernels
from ds_kernels._ops import CPU_OPTIM, FUSED_OPTIM, set_default_registry
from ds_kernels._registry import Backend, KernelBuildWarning, OpKind, OpRegistry, OpSpec

# Runs CPUAdam for 20 steps in a child process and prints backend, warnings and the result.
CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import ds_kernels
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000, generator=g))
        opt = ds_kernels.CPUAdam([p], lr=1e-2, weight_decay=0.1)
        ds_kernels.load("cpu_optim")  # loading again must not warn again
        for _ in range(20):
            p.grad = torch.randn(1000, generator=g)
            opt.step()
    msgs = [str(w.message) for w in caught if issubclass(w.category, ds_kernels.KernelBuildWarning)]
    print(json.dumps({"backend": opt.backend, "warnings": msgs, "p": p.detach().tolist()}))
    """
)


def torch_reference() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=g))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        p.grad = torch.randn(1000, generator=g)
        opt.step()
    return p.detach()


def run_child(env_updates: dict[str, str | None], tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["DS_KERNELS_CACHE"] = str(tmp_path / "empty-cache")
    for k, v in env_updates.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "env, named",
    [
        ({"PATH": "/nonexistent-bin", "CXX": None}, "'c++' was not found on PATH"),
        ({"CXX": "/nonexistent/g++"}, "'/nonexistent/g++' was not found"),
    ],
    ids=["no-compiler-on-path", "cxx-points-nowhere"],
)
def test_missing_compiler_falls_back_with_one_warning(env, named, tmp_path):
    from ds_kernels._build import package_prebuilt_dir

    if list(package_prebuilt_dir().glob("cpu_optim-*/manifest.json")):
        pytest.skip("this install ships a prebuilt cpu_optim (DS_BUILD_OPS=1): nothing falls back")
    res = run_child(env, tmp_path)
    assert res["backend"] == "fallback"
    assert len(res["warnings"]) == 1, res["warnings"]
    assert named in res["warnings"][0] and "cpu_optim" in res["warnings"][0]
    # The fallback reproduces torch.optim.AdamW (same order of operations, same rounding).
    torch.testing.assert_close(torch.tensor(res["p"]), torch_reference(), rtol=1e-6, atol=1e-7)


def test_prebuilt_ops_load_without_a_compiler(tmp_path, cpu_op, capsys):
    from ds_kernels.build import main as build_main

    prebuilt = tmp_path / "prebuilt"
    # In-process on purpose: an AOT build after a JIT build of the same op must still build.
    assert build_main(["--dest", str(prebuilt)]) == 0
    assert "built cpu_optim" in capsys.readouterr().out
    assert list(prebuilt.glob("cpu_optim-*/manifest.json"))
    res = run_child({"CXX": "/nonexistent/g++", "DS_KERNELS_PREBUILT": str(prebuilt)}, tmp_path)
    assert res["backend"] == "prebuilt"
    assert res["warnings"] == []
    torch.testing.assert_close(torch.tensor(res["p"]), torch_reference(), rtol=1e-6, atol=1e-6)


def test_second_load_uses_the_cache(cpu_op):
    reg = OpRegistry()
    reg.register(CPU_OPTIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a rebuild nor a fallback may happen
        op = reg.load("cpu_optim")
    assert op.backend in (Backend.CACHED, Backend.PREBUILT)
    assert op.isa in ("avx512", "avx2", "avx", "neon", "sve", "scalar")
    assert reg.status("cpu_optim").built


def test_compile_error_falls_back_and_names_the_error(tmp_path, monkeypatch, cpu_op):
    src = tmp_path / "broken.cpp"
    src.write_text('#include <ds_kernels_missing_header.h>\nextern "C" int f() { return 1; }\n')
    spec = OpSpec(
        name="broken_op",
        summary="does not compile",
        kind=OpKind.CPP,
        fallback=lambda: ds_kernels._cpu_optim_op.TorchCpuOptim(),
        sources=(str(src),),  # absolute: Path join keeps it
        bind=lambda lib: pytest.fail("a failed build must not be bound"),
    )
    monkeypatch.setenv("DS_KERNELS_CACHE", str(tmp_path / "cache"))
    reg = OpRegistry()
    reg.register(spec)
    with pytest.warns(KernelBuildWarning, match="ds_kernels_missing_header.h") as rec:
        op = reg.load("broken_op")
    assert op.backend is Backend.FALLBACK
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.load("broken_op") is op  # once per process: no second warning
    assert len([w for w in rec if issubclass(w.category, KernelBuildWarning)]) == 1


def test_forced_fallback_env_and_unknown_op(monkeypatch):
    monkeypatch.setenv("DS_KERNELS_FORCE_FALLBACK", "cpu_optim")
    reg = OpRegistry()
    reg.register(CPU_OPTIM)
    with pytest.warns(KernelBuildWarning, match="DS_KERNELS_FORCE_FALLBACK"):
        assert reg.load("cpu_optim").backend is Backend.FALLBACK
    with pytest.raises(KeyError, match="known ops: cpu_optim"):
        reg.load("no_such_op")


def test_report_lists_every_op(cpu_op, capsys, monkeypatch):
    from ds_kernels import _report
    from ds_kernels._report import main

    class EP:  # entry points of the ds_report.sections group
        def __init__(self, name, fn):
            self.name, self._fn = name, fn

        def load(self):
            return self._fn

    def broken():
        raise RuntimeError("section exploded")

    monkeypatch.setattr(
        _report, "_section_entry_points", lambda: [EP("extra", lambda: {"k": 1}), EP("bad", broken)]
    )

    rep = ds_kernels.report()
    ops = {o["op"]: o for o in rep["ops"]}
    assert set(ops) == {"cpu_optim", "fused_optim"}
    assert ops["cpu_optim"]["built"] and ops["cpu_optim"]["compatible"]
    assert rep["cxx"]["path"] and rep["torch"] == torch.__version__
    assert main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ops"]
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "cpu_optim" in text and "CPU ISA" in text and "C++ compiler" in text
    assert "[extra]" in text and "section exploded" in text
    assert rep["sections"]["extra"] == {"k": 1}


def test_fused_optimizers_fall_back_without_a_gpu(monkeypatch):
    """No CUDA device and no interpreter: FusedAdam runs on the pure-torch path, warns once,
    and still matches torch.optim.AdamW."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton path is used")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reg = OpRegistry()
    reg.register(FUSED_OPTIM)
    set_default_registry(reg)
    try:
        with pytest.warns(KernelBuildWarning, match="fused_optim") as rec:
            g = torch.Generator().manual_seed(0)
            p = torch.nn.Parameter(torch.randn(100, generator=g))
            q = torch.nn.Parameter(p.detach().clone())
            opt = ds_kernels.FusedAdam([p], lr=1e-2, weight_decay=0.1)
            ds_kernels.FusedLion([torch.nn.Parameter(torch.zeros(3))])  # same op: no new warning
        assert len([w for w in rec if issubclass(w.category, KernelBuildWarning)]) == 1
        assert opt.backend == "fallback"
        ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
        for _ in range(5):
            grad = torch.randn(100, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
            opt.step()
            ref.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    finally:
        set_default_registry(None)
