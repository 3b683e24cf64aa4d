"""The op registry: JIT build and cache, ahead-of-time builds, and fallbacks that never crash."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
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
    out = {"backend": opt.backend, "library": ds_kernels.load("cpu_optim").detail}
    print(json.dumps({**out, "warnings": msgs, "p": p.detach().tolist()}))
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


def no_packaged_prebuilt() -> None:
    from ds_kernels._build import package_prebuilt_dir

    if list(package_prebuilt_dir().glob("cpu_optim-*/manifest.json")):
        pytest.skip("this install ships a prebuilt cpu_optim (DS_BUILD_OPS=1): nothing falls back")


def bin_with(tmp_path: Path, *tools: str) -> str:
    """A PATH directory holding only these tools (links to the real ones)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for tool in tools:
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} is not installed")
        (d / tool).symlink_to(real)
    return str(d)


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
        ({"PATH": "<bin with c++ only>", "CXX": None}, "ninja was not found (pip install ninja)"),
    ],
    ids=["no-compiler-on-path", "cxx-points-nowhere", "no-ninja-on-path"],
)
def test_missing_build_tool_falls_back_with_one_warning(env, named, tmp_path):
    no_packaged_prebuilt()
    if env.get("PATH") == "<bin with c++ only>":
        env = {**env, "PATH": bin_with(tmp_path, "c++")}
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
    assert op.openmp  # built with -fopenmp: the step runs on OpenMP threads
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
    assert {"cpu_optim", "fused_optim"} <= set(ops)  # plus other packages' (entry points)
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


def test_cache_is_keyed_by_torch_compiler_isa_and_arch(cpu_op, monkeypatch):
    """A cached build is reused only with the same torch, compiler, CPU ISA and arch."""
    from ds_kernels import _toolchain

    reg = OpRegistry()
    reg.register(CPU_OPTIM)
    assert reg.status("cpu_optim").built  # the session's JIT build
    facts = _toolchain.build_facts(
        "cpu_optim", CPU_OPTIM.source_paths(), CPU_OPTIM.cflags(), _toolchain.find_compiler(),
        uses_cuda=False,
    )  # fmt: skip
    changed = {
        "torch": "2.99.0",
        "python": "3.99",
        "machine": "aarch64",
        "compiler": "g++ 99.1",
        "cpu_isa": ("sse4_2",),
        "cuda_arch": ("9.0",),
        "sources_sha": "0" * 16,
        "flags": ("-O2",),
    }
    keys = {facts.key} | {dataclasses.replace(facts, **{k: v}).key for k, v in changed.items()}
    assert len(keys) == 1 + len(changed)  # every fact changes the directory
    real = _toolchain.find_compiler()

    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.99.0")
        assert not reg.status("cpu_optim").built
    with monkeypatch.context() as m:
        m.setattr(_toolchain, "cpu_isa", lambda: ("sse4_2",))
        assert not reg.status("cpu_optim").built
    with monkeypatch.context() as m:
        other = _toolchain.Compiler(real.requested, real.path, "g++ (other) 99.1")
        m.setattr(_toolchain, "find_compiler", lambda: other)
        st = reg.status("cpu_optim")
        assert st.compatible and not st.built  # would JIT-build with the other compiler
    with monkeypatch.context() as m:
        # No compiler at all: a build whose runtime facts match is used, whoever compiled it...
        m.setattr(_toolchain, "find_compiler", lambda: _toolchain.Compiler("c++", None, ""))
        assert reg.status("cpu_optim").built
        m.setattr(torch, "__version__", "2.99.0")  # ...but not one made for another torch
        assert not reg.status("cpu_optim").built
    assert reg.status("cpu_optim").built


def test_report_says_fallback_and_why_without_a_compiler(tmp_path, monkeypatch):
    from ds_kernels._report import format_report

    no_packaged_prebuilt()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("DS_KERNELS_CACHE", str(tmp_path / "empty-cache"))
    reg = OpRegistry()
    reg.register(CPU_OPTIM)
    set_default_registry(reg)
    try:
        rep = ds_kernels.report()
    finally:
        set_default_registry(None)
    (op,) = rep["ops"]
    assert (op["compatible"], op["built"], op["state"]) == (False, False, "fallback")
    assert "'c++' was not found on PATH" in op["detail"]
    text = format_report(rep)
    for line in ("torch .....", "accelerator .....", "C++ compiler ...... NOT FOUND (c++)",
                 "ninja ............. NOT FOUND", "CPU ISA ....."):  # fmt: skip
        assert line in text, line
    assert "cpu_optim     NO          no      fallback" in text


def test_wheel_built_with_ds_build_ops_ships_the_op(tmp_path, cpu_op):
    """DS_BUILD_OPS=1 at wheel build: the wheel carries the compiled op (and not ninja's
    leftovers), the source tree is untouched, and the installed package loads the op with no
    compiler, no warning and torch's numbers."""
    import importlib.util

    if importlib.util.find_spec("hatchling") is None:
        if os.environ.get("DS_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail("hatchling is needed (it is in the test extra)")
        pytest.skip("hatchling is not installed (pip install hatchling)")
    tree = tmp_path / "tree"
    shutil.copytree(
        Path(__file__).resolve().parents[1], tree,
        ignore=shutil.ignore_patterns("_prebuilt", "__pycache__", ".pytest_cache", "tests"),
    )  # fmt: skip
    env = dict(os.environ, DS_BUILD_OPS="1", DS_KERNELS_CACHE=str(tmp_path / "build-cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    out = subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(tree)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert not (tree / "src" / "ds_kernels" / "_prebuilt").exists()
    (wheel,) = (tmp_path / "dist").glob("ds_kernels-*.whl")
    assert not wheel.name.endswith("-none-any.whl")  # a platform wheel: it holds a library
    shipped = [n for n in zipfile.ZipFile(wheel).namelist() if "/_prebuilt/" in n]
    assert sorted(Path(n).suffix or Path(n).name for n in shipped) == [".json", ".so"], shipped
    # Installed = the wheel's import tree on sys.path (what pip unpacks; unzipping is faster).
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    res = run_child({"CXX": "/nonexistent/g++", "PYTHONPATH": str(target)}, tmp_path)
    assert res["backend"] == "prebuilt" and res["warnings"] == []
    assert res["library"].startswith(str(target / "ds_kernels" / "_prebuilt"))
    torch.testing.assert_close(torch.tensor(res["p"]), torch_reference(), rtol=1e-6, atol=1e-6)
