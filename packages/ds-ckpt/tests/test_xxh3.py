"""Tier 1: the GIL-free XXH3-64 binding gives xxhash's own digests, refuses a function that does
not, and falls back to the Python functions; verified loads check every chunk whatever the
page cache holds and whatever the pread size."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import xxhash

import ds_ckpt
import ds_ckpt._load as ld
import ds_ckpt._stfile as stf
from ds_ckpt import Fragment, _xxh3
from ds_ckpt._checksum import PieceDigest

MiB = 1 << 20


def _reference(data: bytes, chunk: int) -> str:
    return "".join(
        xxhash.xxh3_64_hexdigest(data[j : j + chunk]) for j in range(0, len(data), chunk)
    )


def test_the_gil_free_binding_is_in_use():
    """The PyPI wheels of xxhash 3.x and 4.x export the C entry points; without them every
    load's hashing runs one thread at a time (still correct, through the fallback)."""
    assert _xxh3.NATIVE is not None, "xxhash's extension exports no usable XXH3_64bits"


def test_native_digests_equal_xxhash_on_random_lengths_and_offsets():
    rng = random.Random(7)
    data = bytearray(rng.randbytes(3 * MiB + 4099))
    view = memoryview(data)
    for _ in range(60):
        a = rng.randrange(0, 5000)
        b = rng.choice([a + rng.randrange(0, 300), a + rng.randrange(0, 3 * MiB)])
        part = view[a : min(b, len(data))]
        # at most ~1000 chunks a case: the test's time goes to the hashing, not to the calls
        chunk = max(rng.choice([1, 7, 64, 1000, 4096, MiB]), len(part) // 1000 + 1)
        want = _reference(bytes(part), chunk)
        assert _xxh3.chunk_digests(part, chunk) == want, (a, b, chunk)
        # a read-only view takes the Python functions: the same digests
        assert _xxh3.chunk_digests(memoryview(bytes(part)), chunk) == want


def test_a_function_that_disagrees_is_refused(monkeypatch):
    assert not _xxh3._agrees(lambda addr, n: 0)
    assert not _xxh3._agrees(lambda addr, n: xxhash.xxh3_64_intdigest(b"x" * n))  # ignores data
    # and with no binding the Python functions give the same digests
    data = bytearray(random.Random(1).randbytes(2 * MiB + 5))
    want = _xxh3.chunk_digests(memoryview(data), MiB)
    monkeypatch.setattr(_xxh3, "NATIVE", None)
    assert _xxh3.chunk_digests(memoryview(data), MiB) == want == _reference(bytes(data), MiB)


@pytest.mark.parametrize("writable", [True, False])
def test_piece_digest_segments_in_place_and_read_only(writable):
    """Whole chunks go through the binding (writable views), partial ones through xxhash's
    streaming state: segment boundaries anywhere give the digest of the whole."""
    raw = random.Random(3).randbytes(5 * 4096 + 123)
    view = memoryview(bytearray(raw) if writable else raw)
    want = _reference(raw, 4096)
    for sizes in ([4096 * 5 + 123], [1, 4095, 4096, 8193, 3], [4000, 200, 12000, 4096 * 2]):
        d = PieceDigest(4096)
        pos = 0
        for n in sizes:
            d.update(view[pos : pos + n])
            pos += n
        d.update(view[pos:])
        assert d.finish() == (None, want), sizes


N = 5 * MiB + 1000  # fp32: 20 MiB + 4000 bytes, 21 chunks (the last short), two 16 MiB spans
FLIPS = (0, 4, 16, 20)  # first chunk, one inside a pread, the second span's first, the last


def _saved(root):
    w = torch.randn(N, generator=torch.Generator().manual_seed(0))
    ds_ckpt.save(root, "t", [Fragment.whole("w", w)])
    (f,) = (root / "t").glob("*.safetensors")
    m = json.loads((root / "t" / "manifest.json").read_text())
    return w, f, m["tensors"]["w"]["fragments"][0]["byte_start"]


def _evict(f):
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _check_every_chunk(root, f, w, start, before_load=lambda: None):
    """The intact file loads bitwise; a byte flipped in each of FLIPS is reported with its
    chunk's elements (more than one request: the threaded path)."""
    out = torch.zeros(N)
    before_load()
    ds_ckpt.load(root, "t", [Fragment.whole("w", out)])
    assert torch.equal(out, w)
    original = f.read_bytes()
    per = MiB // 4
    for k in FLIPS:
        raw = bytearray(original)
        raw[start + k * MiB + 1001] ^= 0x10
        f.write_bytes(bytes(raw))
        before_load()
        with pytest.raises(
            ds_ckpt.CheckpointCorruptError,
            match=rf"mismatch in tensor 'w', elements \[{k * per}, {min((k + 1) * per, N)}\)",
        ):
            ds_ckpt.load(root, "t", [Fragment.whole("w", out)])
    f.write_bytes(original)


@pytest.mark.parametrize("verify_read", [MiB, 3 * MiB])
@pytest.mark.parametrize("cached", ["all", "none", "first 5 MiB", "no RWF_NOWAIT"])
def test_verified_load_checks_every_chunk_whatever_the_page_cache_holds(
    tmp_path, monkeypatch, verify_read, cached
):
    """The page-cache state decides how a verified span is read (small cache-only preads, then
    one pread of the rest): every state must still check every chunk. The states are made
    exact by standing in for the cache-only read: "all" serves every read (and ordinary preads
    are refused, so nothing else reads), "none" serves none (a one-byte probe per span, nothing more),
    "first 5 MiB" serves reads inside the first 5 MiB of the data (the first span switches to
    one pread midway, the second reads cold)."""
    monkeypatch.setattr(ld, "_VERIFY_READ", verify_read)
    monkeypatch.setattr(ld, "_PROBE_CACHE", True)  # the default only where threads outnumber cores
    w, f, start = _saved(tmp_path)
    probes = []

    def from_file(fd, at, view):
        return os.preadv(fd, [view], at)

    if cached == "all":
        monkeypatch.setattr(ld, "pread_cached", from_file)

        def refuse(*a, **k):
            raise AssertionError("a blocking pread although everything was cached")

        monkeypatch.setattr(ld, "pread_into", refuse)
    elif cached == "none":
        monkeypatch.setattr(
            ld, "pread_cached", lambda fd, at, view: probes.append((at, len(view))) or 0
        )
    elif cached == "first 5 MiB":
        monkeypatch.setattr(
            ld,
            "pread_cached",
            lambda fd, at, view: (
                from_file(fd, at, view) if at + len(view) <= start + 5 * MiB else 0
            ),
        )
    else:
        monkeypatch.setattr(stf, "_NOWAIT", 0)
    _check_every_chunk(tmp_path, f, w, start)
    if cached == "none":  # only one-byte probes, one at the start of each span
        assert set(probes) == {(start, 1), (start + 16 * MiB, 1)}


def test_verified_load_without_the_probe_reads_each_span_once_and_checks_every_chunk(
    tmp_path, monkeypatch
):
    """Where each read thread has a core (_PROBE_CACHE off), a verified span is one pread,
    hashed after it: no cache-only reads, and still every chunk checked."""
    monkeypatch.setattr(ld, "_PROBE_CACHE", False)

    def refuse(*a, **k):
        raise AssertionError("a page-cache probe with the probe switched off")

    monkeypatch.setattr(ld, "pread_cached", refuse)
    w, f, start = _saved(tmp_path)
    _check_every_chunk(tmp_path, f, w, start)


def test_read_threads_one_per_core_within_8_to_16():
    assert [ld._read_threads(c) for c in (1, 2, 8, 12, 16, 64)] == [8, 8, 8, 12, 16, 16]


def test_verified_cold_load_with_the_real_page_cache(tmp_path):
    """The same with the kernel's RWF_NOWAIT reads, the file's page cache dropped before every
    load (where the file system can drop it) and the checkpoint read twice: cold, then warm."""
    w, f, start = _saved(tmp_path)
    _check_every_chunk(tmp_path, f, w, start, before_load=lambda: _evict(f))
    _check_every_chunk(tmp_path, f, w, start)
