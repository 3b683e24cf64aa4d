"""ds-accel on CPU: detection, the DS_ACCELERATOR override, the CPU accelerator's methods, a
plugin registered through a real entry point, and CUDA tests marked gpu."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ds_accel
from ds_accel import (
    Accelerator,
    AcceleratorError,
    CPUAccelerator,
    get_accelerator,
    reset_accelerator,
    set_accelerator,
)


@pytest.fixture(autouse=True)
def _fresh_default(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    reset_accelerator()
    yield
    reset_accelerator()


def _run(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="detection picks cuda on a GPU machine")
def test_detects_cpu_here():
    acc = get_accelerator()
    assert isinstance(acc, CPUAccelerator)
    assert acc.device_name() == "cpu"
    assert acc.device_name(0) == "cpu"
    assert acc.communication_backend_name() == "gloo"
    assert get_accelerator() is acc  # cached


def test_bogus_name_lists_valid_ones():
    proc = _run("import ds_accel; ds_accel.get_accelerator()", {"DS_ACCELERATOR": "bogus"})
    assert proc.returncode != 0
    assert "unknown accelerator 'bogus'" in proc.stderr
    assert "cpu, cuda, mps" in proc.stderr
    assert "DS_ACCELERATOR" in proc.stderr


def test_env_forces_cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "CPU")
    assert get_accelerator().name == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
def test_forcing_an_unavailable_accelerator_says_so(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(AcceleratorError, match="not available"):
        get_accelerator()


def test_set_and_reset_override():
    mine = CPUAccelerator()
    assert set_accelerator(mine) is mine
    assert get_accelerator() is mine
    reset_accelerator()
    assert get_accelerator() is not mine
    assert set_accelerator("cpu").name == "cpu"
    with pytest.raises(TypeError):
        set_accelerator(42)  # type: ignore[arg-type]
    with pytest.raises(AcceleratorError):
        set_accelerator("nope")


def test_cpu_methods():
    acc = CPUAccelerator()
    assert acc.is_available() and acc.device_count() == 1 and acc.current_device() == 0
    acc.set_device(0)
    with pytest.raises(ValueError, match="one device"):
        acc.set_device(1)
    assert acc.device() == torch.device("cpu")
    acc.synchronize()
    s = acc.Stream()
    with acc.stream(s):
        x = torch.ones(4) * 2
    s.synchronize()
    assert acc.current_stream() is not None and acc.default_stream() is not None
    start, end = acc.Event(enable_timing=True), acc.Event(enable_timing=True)
    start.record()
    _ = x.sum()
    end.record()
    end.synchronize()
    assert end.query() and start.elapsed_time(end) >= 0.0
    with pytest.raises(RuntimeError, match="record"):
        acc.Event().elapsed_time(acc.Event())
    assert acc.memory_allocated() > 0
    big = torch.empty(64 * 1024 * 1024, dtype=torch.uint8).fill_(1)  # 64 MiB resident
    assert acc.max_memory_allocated() >= acc.memory_allocated() - 1
    del big
    acc.reset_peak_memory_stats()
    assert acc.total_memory() > 0 and acc.available_memory() > 0
    stats = acc.memory_stats()
    assert set(stats) >= {"allocated_bytes", "max_allocated_bytes", "reserved_bytes"}
    t = torch.zeros(3)
    assert acc.pin_memory(t) is t and not acc.is_pinned(t)
    assert torch.bfloat16 in acc.supported_dtypes()
    acc.manual_seed(3)
    a = torch.rand(2)
    acc.set_rng_state(acc.get_rng_state())
    acc.manual_seed_all(3)
    assert torch.equal(a, torch.rand(2))
    acc.range_push("x")
    acc.range_pop()
    acc.empty_cache()
    flags = acc.build_flags()
    assert "-O3" in flags["cxx"] and flags["cuda_arch_list"] == []
    assert isinstance(flags["cpu_isa"], list)
    env: dict[str, str] = {}
    acc.set_visible_devices_envs(env, [0, 1])
    assert env == {}  # the host has no visible-devices variable


def test_report_and_cli():
    rep = ds_accel.report()
    assert rep["accelerator"] == get_accelerator().name
    assert {"cpu", "cuda", "mps"} <= set(rep["known_accelerators"])
    proc = _run("from ds_accel._cli import main; raise SystemExit(main())")
    assert proc.returncode == 0, proc.stderr
    assert '"communication_backend"' in proc.stdout


def test_cuda_and_mps_objects_answer_without_a_device():
    cuda = ds_accel.CUDAAccelerator()
    assert cuda.communication_backend_name() == "nccl"
    assert "CUDA_VISIBLE_DEVICES" in cuda.visible_devices_envs()
    env: dict[str, str] = {}
    cuda.set_visible_devices_envs(env, [2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert cuda.device_name(1) == "cuda:1"
    assert ds_accel.MPSAccelerator().device_name(0) == "mps"
    if not torch.cuda.is_available():
        assert not cuda.is_available() and cuda.report()["device_count"] == 0


PLUGIN = """
import contextlib
from ds_accel import CPUAccelerator

class FancyAccelerator(CPUAccelerator):
    name = "fancy"
    def communication_backend_name(self):
        return "fancy-ccl"

class NotAnAccelerator:
    pass
"""


def _make_plugin(tmp_path, target: str, name: str = "fancy") -> str:
    """A distribution on sys.path with an entry point in group ds_accel.accelerators: the same
    metadata pip writes when it installs a package that declares the entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "fancy_accel.py").write_text(PLUGIN)
    info = site / "fancy_accel-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-accel\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ds_accel.accelerators]\n{name} = {target}\n")
    return str(site)


def test_plugin_through_entry_point(tmp_path):
    site = _make_plugin(tmp_path, "fancy_accel:FancyAccelerator")
    code = """
        import ds_accel
        assert "fancy" in ds_accel.known_accelerators(), ds_accel.known_accelerators()
        acc = ds_accel.get_accelerator()
        print(acc.name, acc.communication_backend_name(), acc.device_name())
    """
    proc = _run(code, {"PYTHONPATH": site, "DS_ACCELERATOR": "fancy"})
    assert proc.returncode == 0, proc.stderr
    # the plugin derives from the CPU accelerator, so its torch device string stays "cpu"
    assert proc.stdout.split() == ["fancy", "fancy-ccl", "cpu"]


def test_plugin_of_wrong_type_is_a_clear_error(tmp_path):
    site = _make_plugin(tmp_path, "fancy_accel:NotAnAccelerator")
    proc = _run("import ds_accel; ds_accel.get_accelerator()",
                {"PYTHONPATH": site, "DS_ACCELERATOR": "fancy"})  # fmt: skip
    assert proc.returncode != 0
    assert "not a ds_accel.Accelerator subclass" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="detection picks cuda on a GPU machine")
def test_plugin_is_detected_without_the_override(tmp_path):
    # No DS_ACCELERATOR: an available plugin is preferred to the CPU fallback.
    site = _make_plugin(tmp_path, "fancy_accel:FancyAccelerator")
    code = """
        import ds_accel
        rep = ds_accel.report()
        print(ds_accel.get_accelerator().name, rep["accelerator"], rep["communication_backend"],
              "fancy" in rep["known_accelerators"])
    """
    proc = _run(code, {"PYTHONPATH": site})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fancy", "fancy", "fancy-ccl", "True"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="detection picks cuda on a GPU machine")
def test_broken_plugin_skipped_by_detection_and_named_when_forced(tmp_path):
    site = _make_plugin(tmp_path, "no_such_module:Accel", name="broken")
    proc = _run("import ds_accel; print(ds_accel.get_accelerator().name)", {"PYTHONPATH": site})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu"]  # a plugin that fails to load never stops detection
    proc = _run("import ds_accel; ds_accel.get_accelerator()",
                {"PYTHONPATH": site, "DS_ACCELERATOR": "broken"})  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ds_accel._registry.AcceleratorError: the accelerator plugin 'broken'")
    assert "no_such_module:Accel" in last and "from fancy-accel" in last
    assert "ModuleNotFoundError" in last and "cpu, cuda, mps" in last


def test_custom_subclass_must_implement_abstract_methods():
    class Half(Accelerator):
        name = "half"

    with pytest.raises(TypeError):
        Half()  # type: ignore[abstract]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_accelerator_on_gpu():
    acc = get_accelerator()
    assert acc.name == "cuda" and acc.device_count() >= 1
    acc.set_device(0)
    assert acc.current_device_name() == "cuda:0"
    s = acc.Stream()
    start, end = acc.Event(enable_timing=True), acc.Event(enable_timing=True)
    with acc.stream(s):
        start.record()
        x = torch.ones(1024, 1024, device="cuda") @ torch.ones(1024, 1024, device="cuda")
        end.record()
    acc.synchronize()
    assert start.elapsed_time(end) > 0 and x[0, 0].item() == 1024
    assert acc.memory_allocated() > 0 and acc.max_memory_allocated() >= acc.memory_allocated()
    assert acc.total_memory() > acc.available_memory() > 0
    pinned = acc.pin_memory(torch.zeros(8))
    assert acc.is_pinned(pinned)
    assert acc.build_flags()["cuda_arch_list"]
    assert acc.communication_backend_name() == "nccl"


def test_usable_cores_is_the_affinity_set(monkeypatch):
    import os

    from ds_accel import usable_cores

    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert usable_cores() == 3
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert usable_cores() == 12  # no affinity call: the machine's count
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1
