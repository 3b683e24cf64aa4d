"""Consolidation to one safetensors file, streamed through a bounded buffer.

DeepSpeed's zero_to_fp32 gathers the whole model in memory (twice, with the conversion). Here
the output header is computed from the manifest alone, then each tensor is copied chunk by chunk
(pread, convert dtype, write), so memory stays at about two chunks whatever the model size.
"""

from __future__ import annotations

import os

import torch

from ds_ckpt._commit import fsync_dir
from ds_ckpt._dtypes import from_st, itemsize, to_st
from ds_ckpt._fragment import global_numel
from ds_ckpt._load import (
    _check_files,
    _range_tasks,
    _TaskRunner,
    open_checkpoint,
    warn_unverified,
)
from ds_ckpt._plan import RangeIndex, Stored
from ds_ckpt._stfile import byte_view, layout, write_all

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def consolidate(
    dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tag: str | None = None,
    dtype: torch.dtype | None = None,
    include_optimizer: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, int]:
    """Write the full tensors of a checkpoint to one safetensors file at `out`.

    Every byte read is verified as load() verifies it (manifest, header and chunk checksums); a
    mismatch raises CheckpointCorruptError naming the file and tensor, and `out` is not
    written. Optimizer state (names starting with 'optimizer.') is left out unless
    include_optimizer.
    `dtype` converts floating-point tensors (integer/bool tensors keep theirs). The file is
    written to a temporary name and renamed, so `out` is never half-written. Returns
    {"tensors": n, "bytes": size}.
    """
    out = os.fspath(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(
            f"consolidate: the output directory {parent} (of {out}) does not exist; create it "
            "first or choose another --out"
        )
    if os.path.isdir(out):
        raise ValueError(
            f"consolidate: {out} is a directory; give the path of the .safetensors file to write"
        )
    tag_dir, m = open_checkpoint(dir, tag)
    if not m.verified:
        warn_unverified(
            tag_dir, "consolidate reads it UNVERIFIED", "; `ds-ckpt verify` checks SHA-256"
        )
    sum_chunk = m.chunk_bytes if m.verified else 0
    names = [n for n in m.tensors if include_optimizer or not n.startswith("optimizer.")]
    if not names:
        raise ValueError(
            f"{tag_dir}: no tensors to consolidate (all are optimizer state; pass "
            "include_optimizer=True / --include-optimizer)"
        )
    _check_files(tag_dir, m, set(m.files))
    src_dt = {n: from_st(m.tensors[n].dtype, what=n) for n in names}
    out_dt = {
        n: dtype if dtype is not None and src_dt[n].is_floating_point else src_dt[n] for n in names
    }
    entries = [
        (n, to_st(out_dt[n]), global_numel(tuple(m.tensors[n].shape)), itemsize(out_dt[n]))
        for n in names
    ]
    header, placed = layout(entries, [m.tensors[n].shape for n in names])
    tmp = out + ".tmp"
    fds: dict[str, int] = {}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    runner = _TaskRunner(tag_dir, fds, {}, sum_chunk)
    try:
        write_all(fd, memoryview(header))
        for n, e in zip(names, placed):
            rec = m.tensors[n]
            idx = RangeIndex(
                n,
                e.numel,
                [
                    Stored(f.file, f.offset, f.numel, f.byte_start, f.sha256, f.chunk_hashes)
                    for f in rec.fragments
                ],
            )
            src_isz = itemsize(src_dt[n])
            step = max(1, chunk_bytes // max(src_isz, e.itemsize))
            buf = torch.empty(min(step, e.numel), dtype=src_dt[n])
            view = byte_view(buf)
            for a in range(0, e.numel, step):
                k = min(step, e.numel - a)
                for r in idx.reads(a, k, src_isz):
                    if r.file not in fds:
                        fds[r.file] = os.open(os.path.join(tag_dir, r.file), os.O_RDONLY)
                    # the same verified reads as load(): every chunk checksum of what is read
                    for t in _range_tasks(
                        r.file,
                        r.stored,
                        r.byte_start,
                        view[r.dst * src_isz : (r.dst + r.numel) * src_isz],
                        n,
                        src_isz,
                        sum_chunk if r.stored.chunk_hashes is not None else 0,
                    ):
                        runner.run(t)
                chunk = buf[:k] if out_dt[n] == src_dt[n] else buf[:k].to(out_dt[n])
                write_all(fd, byte_view(chunk))
        os.fsync(fd)
        size = os.lseek(fd, 0, os.SEEK_CUR)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    finally:
        for f in fds.values():
            os.close(f)
    os.close(fd)
    os.replace(tmp, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    return {"tensors": len(names), "bytes": size}
