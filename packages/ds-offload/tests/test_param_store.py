"""NvmeParamStore (ds_zero's ParamShardStore on NVMe): round trips across sizes, dtypes and
buffer counts, learned read-ahead, write-backs, max_in_cpu, and its errors."""

from __future__ import annotations

import os

import pytest
import torch
from _faults import disk_full_after

from ds_offload import NvmeParamStore, NvmePathError, OffloadWarning, _nvme

SIZES = [1, 7, 1000, 1024, 4097, 30_001]  # unaligned, page-sized and larger shards


def _store(path, **extra) -> NvmeParamStore:
    section = {"device": "nvme", "nvme_path": str(path), "max_in_cpu": 0, "buffer_count": 2}
    return NvmeParamStore({**section, **extra})


def _files(root) -> list[str]:
    """The swap files under ``root`` (not the swap directories' lock files)."""
    return sorted(f for _, _, fs in os.walk(root) for f in fs if f.endswith(".bin"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("buffer_count", [1, 2, 5])
def test_round_trip_and_write_back(tmp_path, dtype, buffer_count):
    g = torch.Generator().manual_seed(buffer_count)
    values = {k: torch.randn(n, generator=g).to(dtype) for k, n in enumerate(SIZES)}
    store = _store(tmp_path, buffer_count=buffer_count)
    for k, v in values.items():
        store.add(k, v.clone())
    assert len(_files(tmp_path)) == len(SIZES)
    for _ in range(2):  # evictions: more shards than buffers
        for k, v in values.items():
            got = store.acquire(k)
            assert got.dtype == dtype and torch.equal(got, v), k
            store.release(k)
    # writes take fp32 (the master) and cast; a shard written then read comes back
    for k in values:
        new = torch.randn(SIZES[k], generator=g)
        store.write(k, new)
        values[k] = new.to(dtype)
    store.flush()
    for k in reversed(list(values)):
        assert torch.equal(store.read(k), values[k]), k
    store.close()
    assert _files(tmp_path) == []  # swap files removed


def test_repeated_order_is_read_ahead(tmp_path):
    """Stage 3's order (forward, then backward reversed) repeats every step: after one step the
    reads of later shards start before they are acquired."""
    n_keys, rounds = 8, 3
    store = _store(tmp_path, buffer_count=3)
    vals = [torch.full((5000,), float(k)) for k in range(n_keys)]
    for k, v in enumerate(vals):
        store.add(k, v)
    order = list(range(n_keys)) + list(reversed(range(n_keys - 1)))
    for r in range(rounds):
        for k in order:
            assert torch.equal(store.acquire(k), vals[k])
            store.release(k)
        if r == 0:
            first_on_demand = store.stats.reads - store.stats.prefetched
    stats = store.stats
    # from the second round on, every shard not still in a buffer was read ahead of its use
    assert stats.reads - stats.prefetched == first_on_demand, stats
    assert stats.prefetched >= (rounds - 1) * (len(order) - 3 * 2), stats
    store.close()


def test_max_in_cpu_keeps_the_first_shards_in_memory(tmp_path):
    store = _store(tmp_path, max_in_cpu=3000)
    for k, n in enumerate([1000, 2000, 1500, 10]):
        store.add(k, torch.arange(n, dtype=torch.float32))
    # 1000 + 2000 fit in 3000; 1500 does not, and 10 still fits in what is left (0): NVMe
    assert [store.shards[k].file is None for k in range(4)] == [True, True, False, False]
    assert (store.stats.resident, store.stats.on_nvme) == (2, 2)
    assert len(_files(tmp_path)) == 2
    store.write(0, torch.ones(1000))
    assert torch.equal(store.read(0), torch.ones(1000))
    assert torch.equal(store.read(2), torch.arange(1500, dtype=torch.float32))
    store.close()


def test_a_write_while_acquired_and_misuse_are_errors(tmp_path):
    store = _store(tmp_path, buffer_count=1)
    store.add(0, torch.zeros(10))
    store.add(1, torch.zeros(10))
    with pytest.raises(ValueError, match="added already"):
        store.add(0, torch.zeros(10))
    store.acquire(0)
    with pytest.raises(RuntimeError, match="release it before writing"):
        store.write(0, torch.ones(10))
    with pytest.raises(RuntimeError, match="buffer_count=1 buffers are held"):
        store.acquire(1)
    store.release(0)
    with pytest.raises(RuntimeError, match="not acquired"):
        store.release(0)
    with pytest.raises(ValueError, match="holds 10 elements, got 11"):
        store.write(1, torch.ones(11))
    with pytest.raises(KeyError, match="no shard with key 7"):
        store.acquire(7)
    with pytest.raises(RuntimeError, match="before first use"):
        store.add(2, torch.zeros(3))
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.acquire(0)


def test_shard_larger_than_buffer_size_warns_once_and_sizes_the_buffers(tmp_path):
    store = _store(tmp_path, buffer_size=100)
    with pytest.warns(OffloadWarning, match=r"offload_param.buffer_size is 100 elements .* 101"):
        store.add(0, torch.zeros(101))
    store.add(1, torch.arange(150, dtype=torch.float32))  # no second warning
    assert torch.equal(store.read(1), torch.arange(150, dtype=torch.float32))
    assert store.slots[0].buffer.numel() == 150 * 4
    store.close()


def test_bad_nvme_path_and_device(tmp_path):
    with pytest.raises(NvmePathError, match=r"offload_param.nvme_path=.* does not exist"):
        _store(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NvmePathError, match="is not a directory"):
        _store(tmp_path / "file")
    with pytest.raises(ValueError, match="device is 'cpu'"):
        NvmeParamStore({"device": "cpu"})
    with pytest.raises(ValueError, match="nvme_path is not set"):
        NvmeParamStore({"device": "nvme"})


def test_full_disk_at_add_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(_nvme.shutil, "disk_usage", lambda p: type("U", (), {"free": 50_000})())
    store = _store(tmp_path)
    values = torch.arange(40_000, dtype=torch.float32)  # 160 kB > 50 kB free
    keep = values.clone()
    with pytest.raises(NvmePathError, match=r"nvme_path=.* has 50000 bytes free"):
        store.add(0, values)
    assert torch.equal(values, keep)  # the caller's values untouched
    assert _files(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_disk_filling_up_between_shards(tmp_path, monkeypatch):
    disk_full_after(monkeypatch, 2)
    store = _store(tmp_path)
    store.add(0, torch.zeros(5000))
    store.add(1, torch.zeros(5000))
    with pytest.raises(NvmePathError, match=r"is full: reserving \d+ bytes"):
        store.add(2, torch.zeros(5000))
    assert list(tmp_path.iterdir()) == []  # the earlier shards' files are removed too


def test_io_error_on_write_back_surfaces_at_flush(tmp_path):
    from ds_offload import AioError

    store = _store(tmp_path)
    store.add(0, torch.zeros(5000))
    store.read(0)
    # the swap file's directory disappears under the store: the write fails in the IO engine
    # (at submission in the C++ engine, at the wait in the Python one) and the error reaches
    # the caller by the step's flush at the latest, naming the file
    gone = tmp_path / "gone" / "shard0.bin"
    store.shards[0].file = gone
    with pytest.raises(AioError, match="gone/shard0.bin"):
        store.write(0, torch.ones(5000))
        store.flush()
    store.close()
    assert not any(p.name.startswith("ds_offload_param") for p in tmp_path.iterdir())
