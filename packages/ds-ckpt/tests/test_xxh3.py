"""Tier 1: the GIL-free XXH3-64 binding gives xxhash's own digests, refuses a function that does
not, and falls back to the Python functions; loads verify every chunk whatever the pread size."""

from __future__ import annotations

import json
import random

import pytest
import torch
import xxhash

import ds_ckpt
import ds_ckpt._load as ld
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


@pytest.mark.parametrize("verify_read", [MiB, 3 * MiB, None])
def test_verified_load_in_any_pread_size_checks_every_chunk(tmp_path, monkeypatch, verify_read):
    """20 MiB of fp32: more than one request (the threaded path) of 16 MiB spans, read in
    1 MiB, 3 MiB or whole-span preads. A byte flipped in the first chunk, a chunk in the middle
    of a pread, the first chunk of the second span and the short last chunk is each reported
    with its elements; the intact file loads bitwise."""
    if verify_read is not None:
        monkeypatch.setattr(ld, "_VERIFY_READ", verify_read)
    n = 5 * MiB + 1000  # 20 MiB + 4000 bytes: 21 chunks, the last one short
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("w", w)])
    (f,) = (tmp_path / "t").glob("*.safetensors")
    start = json.loads((tmp_path / "t" / "manifest.json").read_text())["tensors"]["w"]["fragments"][
        0
    ]["byte_start"]
    out = torch.zeros(n)
    ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", out)])
    assert torch.equal(out, w)
    original = f.read_bytes()
    per = MiB // 4
    for k in (0, 4, 16, 20):
        raw = bytearray(original)
        raw[start + k * MiB + 1001] ^= 0x10
        f.write_bytes(bytes(raw))
        hi = min((k + 1) * per, n)
        with pytest.raises(
            ds_ckpt.CheckpointCorruptError,
            match=rf"mismatch in tensor 'w', elements \[{k * per}, {hi}\)",
        ):
            ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", out)])
    f.write_bytes(original)
