"""Bad nvme_path (missing, not a directory, read-only, full) and pinned-memory fallback."""

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _faults import disk_full_after
from _zero_like import FlatDriver, offload_train, tiny_model

from ds_offload import NvmePathError, OffloadStepper, _nvme

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def small_tmpfs(path, size="1M", ro=False):
    """A tiny tmpfs at ``path`` (root only; skips otherwise)."""
    if not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _stepper(path, **extra):
    return OffloadStepper({"device": "nvme", "nvme_path": str(path), **extra})


def _big_parts(n=300_000):
    from _zero_like import Part

    return [Part(0, 0, torch.zeros(n), None)]


def test_missing_path(tmp_path):
    s = _stepper(tmp_path / "nope")
    with pytest.raises(
        NvmePathError, match=r"offload_optimizer.nvme_path=.*nope.*does not exist.*mkdir -p"
    ):
        s.setup(_big_parts(10), [{}])


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NvmePathError, match="is not a directory"):
        _stepper(tmp_path / "f").setup(_big_parts(10), [{}])


def test_read_only_path(tmp_path):
    with (
        small_tmpfs(tmp_path / "ro", ro=True) as ro,
        pytest.raises(NvmePathError, match="is not writable.*Read-only"),
    ):
        _stepper(ro).setup(_big_parts(10), [{}])


def test_full_disk_fails_at_setup_and_leaves_nothing(tmp_path):
    with small_tmpfs(tmp_path / "small") as small:
        s = _stepper(small)
        # 300k fp32 elements x 3 states = 3.6 MB > 1 MB
        with pytest.raises(
            NvmePathError, match=r"has \d+ bytes free but the offloaded state needs \d+"
        ):
            s.setup(_big_parts(), [{}])
        assert os.listdir(small) == []


def test_reservation_failure_is_all_or_nothing(tmp_path, monkeypatch):
    # the free-space estimate can be wrong (other writers, quotas): posix_fallocate then fails;
    # the files already made are removed and the error names the path
    with small_tmpfs(tmp_path / "small") as small:
        monkeypatch.setattr(
            _nvme.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 40})()
        )
        from _zero_like import Part

        parts = [Part(i, 0, torch.zeros(40_000), None) for i in range(4)]  # 4 x 480 KB
        with pytest.raises(NvmePathError, match="is full.*reserving"):
            _stepper(small).setup(parts, [{}])
        leftovers = [f for _, _, fs in os.walk(small) for f in fs]
        assert leftovers == []


def test_filling_the_disk_after_setup_does_not_break_steps(tmp_path):
    # swap files are reserved at setup, so a disk that fills up later cannot fail a step half-way
    with small_tmpfs(tmp_path / "small", size="2M") as small:
        s = _stepper(small, buffer_count=2)
        driver = FlatDriver(tiny_model(), 3)
        s.setup(driver.parts, [{"lr": 1e-2, "weight_decay": 0.1}])
        with open(small / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        assert os.statvfs(small).f_bavail == 0
        got = offload_train(driver, s, 3)
        ref = FlatDriver(tiny_model(), 3)
        r = OffloadStepper({"device": "cpu"})
        r.setup(ref.parts, [{"lr": 1e-2, "weight_decay": 0.1}])
        torch.testing.assert_close(got, offload_train(ref, r, 3), atol=0, rtol=0)
        s.close()


def _lp_parts(count=4, n=40_000):
    """ZeRO's bf16 layout: each partition's fp32 master owns its storage, with a bf16 shard."""
    from _zero_like import Part

    g = torch.Generator().manual_seed(3)
    return [
        Part(i, 0, m, m.to(torch.bfloat16))
        for i, m in enumerate(torch.randn(n, generator=g) for _ in range(count))
    ]


def _assert_untouched(parts, before, root):
    for p, b in zip(parts, before):
        # the setup failed: ZeRO's device masters are neither freed nor changed
        assert p.master.untyped_storage().nbytes() == p.master.numel() * 4
        assert torch.equal(p.master, b)
    assert [f for _, _, fs in os.walk(root) for f in fs] == []


def test_free_space_check_needs_no_root(tmp_path, monkeypatch):
    # the same check as the small-tmpfs test, on any filesystem: the free space it reads is small
    monkeypatch.setattr(_nvme.shutil, "disk_usage", lambda p: type("U", (), {"free": 100_000})())
    parts = _lp_parts()
    before = [p.master.clone() for p in parts]
    with pytest.raises(
        NvmePathError, match=r"nvme_path=.* has 100000 bytes free but the offloaded state needs"
    ):
        _stepper(tmp_path).setup(parts, [{}])
    _assert_untouched(parts, before, tmp_path)


def test_disk_filling_up_during_reservation_needs_no_root(tmp_path, monkeypatch):
    # another writer takes the space between the free-space check and the reservation: the
    # third posix_fallocate fails with ENOSPC (failure injection where no small filesystem can be
    # mounted); nothing is left behind and the masters survive, so a retry elsewhere works
    real = os.posix_fallocate
    calls = disk_full_after(monkeypatch, 2)
    parts = _lp_parts()
    before = [p.master.clone() for p in parts]
    with pytest.raises(NvmePathError, match=r"nvme_path=.* is full: reserving \d+ bytes"):
        _stepper(tmp_path).setup(parts, [{}])
    assert len(calls) == 3
    _assert_untouched(parts, before, tmp_path)
    monkeypatch.setattr(_nvme.os, "posix_fallocate", real)
    s = _stepper(tmp_path)
    s.setup(parts, [{}])  # the retry sees the original masters
    for p, b in zip(parts, before):
        assert torch.equal(s.state_tensors(p.index)["master"], b)
    s.close()


def test_io_error_writing_initial_states_leaves_nothing(tmp_path, monkeypatch):
    from ds_offload import AioError, AsyncIO

    real = AsyncIO.pwrite
    count = []

    def failing(self, tensor, path, offset=0, async_op=False):
        count.append(path)
        if len(count) == 2:
            raise AioError(errno.EIO, f"pwrite({path}) failed: injected", str(path))
        return real(self, tensor, path, offset, async_op)

    monkeypatch.setattr(AsyncIO, "pwrite", failing)
    parts = _lp_parts()
    before = [p.master.clone() for p in parts]
    with pytest.raises(AioError, match="part1.bin.*injected"):
        _stepper(tmp_path).setup(parts, [{}])
    _assert_untouched(parts, before, tmp_path)


PIN_SCRIPT = textwrap.dedent(
    """
    import os, resource, warnings
    import torch
    from ds_offload import OffloadWarning, aligned_empty
    from ds_offload._pinned import _libc
    _libc()
    if os.geteuid() == 0:
        os.setgid(65534); os.setuid(65534)   # drop CAP_IPC_LOCK: the limit applies again
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        small = aligned_empty(1024, torch.float32, pin=True)     # 4 KB + slack: fits
        assert not w, [str(x.message) for x in w]
        big = aligned_empty(1 << 20, torch.float32, pin=True)    # 4 MB: beyond the limit
        assert len(w) == 1 and issubclass(w[0].category, OffloadWarning), w
        assert "RLIMIT_MEMLOCK is 65536 bytes" in str(w[0].message), str(w[0].message)
    big.fill_(3.0); small.fill_(1.0)
    assert float(big.sum()) == 3.0 * (1 << 20)
    print("OK")
    """
)


def test_pin_memory_beyond_lockable_limit_falls_back_with_warning(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HOME=str(tmp_path))
    os.chmod(tmp_path, 0o777)
    proc = subprocess.run(
        [sys.executable, "-c", PIN_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


NO_PYDANTIC = textwrap.dedent(
    """
    import sys
    sys.modules["pydantic"] = None   # the GPU machine has no pydantic
    import torch, ds_offload
    s = ds_offload.OffloadStepper({"device": "cpu", "ratio": 1.0}, aio={"intra_op_parallelism": 2})
    assert s.aio_config.thread_count == 2
    for bad, msg in [({"device": "disk"}, "device must be"), ({"device": "cpu", "ratoi": 1}, "ratoi"),
                     ({"device": "nvme"}, "nvme_path is not set")]:
        try:
            ds_offload.OffloadStepper(bad)
        except ValueError as e:
            assert msg in str(e), e
        else:
            raise AssertionError(bad)
    try:
        ds_offload.AioConfig
    except ImportError:
        print("OK")
    """
)


def test_runs_without_pydantic():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-c", NO_PYDANTIC], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


_KILLED_RUN = """
import os, sys
from pathlib import Path
from ds_offload._nvme import SwapDir
d = SwapDir(Path(sys.argv[1]), "zero_optimization.offload_optimizer.nvme_path", "optim")
d.reserve({"part0.bin": 8192})
print(d.dir, flush=True)
os._exit(0)  # like SIGKILL: no cleanup runs
"""


def test_swap_dirs_of_killed_runs_are_removed_by_the_next_run(tmp_path, caplog):
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_RUN)
    root = tmp_path / "nvme"
    root.mkdir()
    out = subprocess.run([sys.executable, str(script), str(root)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    left = Path(out.strip())
    assert (left / "part0.bin").exists()  # the killed run left its swap file behind
    live = _nvme.SwapDir(root, "k", "optim")  # a live run's directory is kept
    assert not left.exists() and "removed 1 swap directory" in caplog.text
    again = _nvme.SwapDir(root, "k", "optim")
    assert live.dir.exists() and again.dir.exists()
    for d in (live, again):
        d.close()
        assert not d.dir.exists()
    assert list(root.iterdir()) == []


def test_swap_dir_dropped_without_close_is_removed(tmp_path):
    import gc

    d = _nvme.SwapDir(tmp_path, "k", "param")
    path = d.dir
    d.reserve({"x.bin": 4096})
    del d
    gc.collect()
    assert not path.exists()
