"""Whole-checkpoint checks and summaries (the `verify` and `inspect` commands)."""

from __future__ import annotations

import os
from typing import Any

from ds_ckpt._checksum import ALGO, HEX, PieceDigest, expected
from ds_ckpt._dtypes import from_st, itemsize
from ds_ckpt._errors import CheckpointCorruptError
from ds_ckpt._fragment import global_numel
from ds_ckpt._load import _check_files, open_checkpoint, warn_unverified
from ds_ckpt._manifest import FragmentRecord
from ds_ckpt._plan import RangeIndex, Stored
from ds_ckpt._stfile import pread_into

_SLAB = 16 * 1024 * 1024  # bytes per read: bounded memory whatever the piece size


def verify(dir: str | os.PathLike, tag: str | None = None, *, hashes: bool = True) -> list[str]:
    """Every problem found (empty when the checkpoint is intact): the manifest checksum,
    coverage, sizes, header checksums, the checksum of every chunk of every stored piece and, with
    hashes=True, the SHA-256 of every stored piece (where the save computed them). Each problem
    names its file."""
    tag_dir, m = open_checkpoint(dir, tag)
    if not m.verified:
        sha = "; SHA-256 is checked where the save stored it" if hashes else ""
        warn_unverified(tag_dir, "verify checks its sizes and layout only", sha)
    problems: list[str] = []
    for name, t in m.tensors.items():
        try:
            from_st(t.dtype, what=name)
            RangeIndex(
                name,
                global_numel(tuple(t.shape)),
                [Stored(f.file, f.offset, f.numel, f.byte_start) for f in t.fragments],
            )
        except ValueError as e:
            problems.append(f"{tag_dir}/manifest.json: {e}")
    for fname in sorted(m.files):
        try:
            _check_files(tag_dir, m, {fname})
        except CheckpointCorruptError as e:
            problems.append(str(e))
    if problems:
        return problems
    for fname in sorted(m.files):
        path = os.path.join(tag_dir, fname)
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, t in m.tensors.items():
                for f in t.fragments:
                    if f.file == fname:
                        problems += _check_piece(fd, path, name, f, m.chunk_bytes, hashes)
        finally:
            os.close(fd)
    return problems


def _check_piece(
    fd: int, path: str, name: str, f: FragmentRecord, chunk: int, hashes: bool
) -> list[str]:
    """Read one stored piece once, in bounded slabs, and compare its chunk checksums and SHA-256."""
    sha = hashes and f.sha256 is not None
    if f.chunk_hashes is None and not sha:
        return []
    d = PieceDigest(chunk, sha256=sha)
    slab = max(chunk, _SLAB // chunk * chunk)
    buf = memoryview(bytearray(min(slab, f.nbytes)))
    for pos in range(0, f.nbytes, slab):
        k = min(slab, f.nbytes - pos)
        pread_into(fd, f.byte_start + pos, buf[:k], path=path)
        d.update(buf[:k])
    got_sha, got_chunks = d.finish()
    out = []
    if f.chunk_hashes is not None and got_chunks != f.chunk_hashes:
        bad = next(
            i
            for i in range(len(got_chunks) // HEX)
            if expected(got_chunks, i) != expected(f.chunk_hashes, i)
        )
        isz = f.nbytes // f.numel if f.numel else 1
        e0 = f.offset + bad * chunk // isz
        e1 = f.offset + min(f.nbytes, (bad + 1) * chunk) // isz
        out.append(
            f"{path}: checksum ({ALGO}) mismatch in tensor {name!r}, elements [{e0}, {e1}) "
            f"(file bytes [{f.byte_start + bad * chunk}, "
            f"{f.byte_start + min(f.nbytes, (bad + 1) * chunk)}))"
        )
    if sha and got_sha != f.sha256:
        out.append(
            f"{path}: SHA-256 mismatch in tensor {name!r} elements [{f.offset}, "
            f"{f.offset + f.numel})"
        )
    return out


def summary(dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """What `ds-ckpt inspect` prints: tag, sizes, and per tensor shape, dtype and fragments."""
    tag_dir, m = open_checkpoint(dir, tag)
    tensors = {
        name: {
            "shape": t.shape,
            "dtype": t.dtype,
            "fragments": len(t.fragments),
            "bytes": global_numel(tuple(t.shape)) * itemsize(from_st(t.dtype)),
        }
        for name, t in m.tensors.items()
    }
    return {
        "path": tag_dir,
        "tag": m.tag,
        "format_version": m.format_version,
        "world_size": m.world_size,
        "files": len(m.files),
        "bytes": m.nbytes(),
        "tensors": tensors,
        "client_state_keys": sorted(m.client_state) if isinstance(m.client_state, dict) else None,
    }
