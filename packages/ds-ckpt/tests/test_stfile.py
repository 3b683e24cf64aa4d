"""Tier 1: the file writer and the read checks: edge dtypes and sizes, O_DIRECT threshold,
failures inside the writer pool, malformed headers and manifests."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading

import pytest
import torch
import xxhash
from safetensors import safe_open

import ds_ckpt
import ds_ckpt._load as ld
import ds_ckpt._stfile as stf
from ds_ckpt import Fragment
from ds_ckpt._cli import main
from ds_ckpt._dtypes import to_st
from ds_ckpt._manifest import signed_json


def _write(path, tensors, **kw):
    ents = [(f"k{i}", to_st(t.dtype), t.numel(), t.element_size()) for i, t in enumerate(tensors)]
    header, placed = stf.layout(ents)
    size, digests, header_hash = stf.write_file(
        str(path), placed, header, [t.reshape(-1) for t in tensors], **kw
    )
    assert header_hash == xxhash.xxh3_64_hexdigest(header)
    return size, digests, len(header) + sum(e.nbytes for e in placed)


def _sha(t):
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _chunk_hashes(t, chunk=1 << 20):
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return "".join(xxhash.xxh3_64_hexdigest(raw[i : i + chunk]) for i in range(0, len(raw), chunk))


@pytest.mark.parametrize("direct", [False, True])
def test_edge_dtypes_and_unaligned_tails(tmp_path, direct):
    """Empty tensors, bool and bf16 at odd byte positions, tails just off a sector boundary:
    the file is exactly header + data long (O_DIRECT padding truncated), reads back with the
    safetensors library, and every digest is the SHA-256 and the chunk XXH3-64s of the tensor's
    bytes."""
    g = torch.Generator().manual_seed(0)
    for tail in (4095, 4096, 4097):
        ts = [
            torch.empty(0),
            torch.rand(3, generator=g) > 0.5,
            torch.randn(5, generator=g).bfloat16(),
            torch.empty(0, 2, dtype=torch.bfloat16),
            torch.randint(0, 255, (tail,), dtype=torch.uint8, generator=g),
        ]
        path = tmp_path / f"f{tail}"
        size, digests, want = _write(path, ts, direct=direct)
        assert size == want == os.path.getsize(path)
        with safe_open(str(path), "pt") as f:
            for i, t in enumerate(ts):
                assert torch.equal(f.get_tensor(f"k{i}").reshape(t.shape), t)
        assert digests == [(_sha(t), _chunk_hashes(t)) for t in ts]


@pytest.mark.parametrize("delta", [-4096, 4097])
def test_files_either_side_of_the_direct_threshold(tmp_path, monkeypatch, delta):
    """A file of _DIRECT_MIN + delta bytes goes through the page cache below the threshold and
    O_DIRECT above it, and loads bitwise through both read paths with hashes."""
    seen = []
    real = stf._StreamWriter.__init__

    def spy(self, fd, total, *, direct, pinned):
        seen.append(direct)
        real(self, fd, total, direct=direct, pinned=pinned)

    monkeypatch.setattr(stf._StreamWriter, "__init__", spy)
    header = 4096  # one entry: the header is padded to one page
    w = torch.randint(0, 255, (stf._DIRECT_MIN + delta - header,), dtype=torch.uint8)
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("w", w)], hashes=True)
    (f,) = (tmp_path / "t").glob("*.safetensors")
    assert f.stat().st_size == stf._DIRECT_MIN + delta
    probe = stf.DirectReader.open(str(f))
    if probe is None:
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    os.close(probe)
    assert seen == [delta > 0]
    for direct_reads in (False, True):
        monkeypatch.setattr(ld, "_DIRECT_READS", direct_reads)
        assert torch.equal(ds_ckpt.load_tensor(tmp_path, "w", verify_hashes=True), w)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ds-ckpt-write")]


@pytest.mark.parametrize("direct", [False, True])
def test_failed_write_in_the_pool_is_raised_and_releases_everything(tmp_path, monkeypatch, direct):
    """A write failing in the writer pool (first, middle or last buffer) is raised by
    write_file, with no descriptor or writer thread left behind; through save() it is a
    CheckpointError naming the rank, nothing is committed and the previous tag still loads."""
    monkeypatch.setattr(stf, "_DIRECT_BLOCK", 1 << 16)  # 16 writes through 4 buffers in turn
    w = torch.randn(1 << 18)
    real = stf._pwrite_all
    calls = []

    def failing(at_call):
        def pwrite(fd, mv, off):
            calls.append(off)
            if len(calls) == at_call + 1:
                raise OSError(28, "No space left on device")
            return real(fd, mv, off)

        return pwrite

    fds = _open_fds()
    for at_call in (0, 7, 16):  # 16: the padded tail of header + 1 MiB
        calls.clear()
        monkeypatch.setattr(stf, "_pwrite_all", failing(at_call))
        with pytest.raises(OSError, match="No space left"):
            _write(tmp_path / f"f{at_call}", [w], direct=direct)
        assert len(calls) > at_call  # the failing call was made
        assert _open_fds() == fds and not _writer_threads()
    monkeypatch.setattr(stf, "_pwrite_all", real)
    ds_ckpt.save(tmp_path / "c", "good", [Fragment.whole("w", w)])
    monkeypatch.setattr(stf, "_pwrite_all", failing(3))
    calls.clear()
    with pytest.raises(ds_ckpt.CheckpointError, match=r"rank 0: OSError.*No space left"):
        ds_ckpt.save(tmp_path / "c", "bad", [Fragment.whole("w", w * 2)])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["good", "latest"]
    assert torch.equal(ds_ckpt.load_tensor(tmp_path / "c", "w", verify_hashes=True), w)


def _one_file(root):
    ds_ckpt.save(root, "t", [Fragment.whole("w", torch.arange(64.0))])
    (f,) = (root / "t").glob("*.safetensors")
    return f


@pytest.mark.parametrize(
    "entry",
    ["x", {"dtype": "F32"}, {"data_offsets": [0]}, {"data_offsets": "ab"}, {"data_offsets": None}],
)
def test_malformed_header_entry_is_corruption_naming_the_file(tmp_path, entry):
    """A header that is valid JSON but holds a garbage entry was a TypeError/KeyError (and a
    traceback from `ds-ckpt verify`); it is a CheckpointCorruptError naming the file."""
    f = _one_file(tmp_path)
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    bad = json.dumps({"w@0": entry}).encode()
    f.write_bytes(raw[:8] + bad + b" " * (n - len(bad)) + raw[8 + n :])
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=rf"{f.name}: header entry 'w@0'"):
        ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", torch.zeros(64))])
    assert main(["verify", str(tmp_path)]) == 1


def _edit_manifest(root, edit):
    """Edit a manifest and sign it again, as a buggy writer would have written it: the checks
    below the manifest checksum must hold on their own."""
    p = root / "t" / "manifest.json"
    m = json.loads(p.read_text())
    m.pop("manifest_xxh3_64")
    edit(m["tensors"]["w"])
    p.write_bytes(signed_json(m))


def test_manifest_dtype_not_matching_the_stored_bytes_is_an_error(tmp_path):
    """A manifest whose dtype says 2-byte elements for 4-byte data passed the header check
    (same byte range) and loaded half the bytes as garbage; the size check now catches it."""
    _one_file(tmp_path)
    _edit_manifest(tmp_path, lambda t: t.update(dtype="BF16"))
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=r"manifest\.json: tensor 'w'.*2-byte"):
        ds_ckpt.load_tensor(tmp_path, "w")
    assert main(["verify", str(tmp_path), "--no-hashes"]) == 1


@pytest.mark.parametrize(("field", "value"), [("numel", "64"), ("byte_start", -1), ("file", [1])])
def test_manifest_fragment_field_types_are_checked(tmp_path, field, value):
    _one_file(tmp_path)
    _edit_manifest(tmp_path, lambda t: t["fragments"][0].update({field: value}))
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=rf"manifest\.json: .*{field}"):
        ds_ckpt.load_tensor(tmp_path, "w")


def test_chunk_digests_do_not_depend_on_how_the_bytes_arrive():
    """Device tensors are digested segment by segment as the writer's buffers fill (buffer
    boundaries fall anywhere in a chunk); the result must equal the digest of the whole."""
    from ds_ckpt._checksum import PieceDigest, digest

    raw = memoryview(bytes(range(256)) * 1000)  # 256000 bytes
    chunk = 4096
    want = digest(raw, chunk, sha256=True)
    assert want[1] == _chunk_hashes(torch.frombuffer(bytearray(raw), dtype=torch.uint8), chunk)
    g = torch.Generator().manual_seed(0)
    for sizes in ([1] * 5000, [4095, 1, 4096, 8193], [chunk * 3], [100_000, 7]):
        d = PieceDigest(chunk, sha256=True)
        pos = 0
        for n in sizes:
            d.update(raw[pos : pos + n])
            pos += n
        cuts = sorted(torch.randint(pos, len(raw), (5,), generator=g).tolist())
        for a, b in zip([pos, *cuts], [*cuts, len(raw)]):
            d.update(raw[a:b])
        assert d.finish() == want, sizes
