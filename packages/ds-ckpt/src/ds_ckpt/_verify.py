"""Whole-checkpoint checks and summaries (the `verify` and `inspect` commands)."""

from __future__ import annotations

import os
from typing import Any

from ds_ckpt._dtypes import from_st, itemsize
from ds_ckpt._errors import CheckpointCorruptError
from ds_ckpt._fragment import global_numel
from ds_ckpt._load import _check_files, open_checkpoint
from ds_ckpt._plan import RangeIndex, Stored
from ds_ckpt._stfile import sha256_range


def verify(dir: str | os.PathLike, tag: str | None = None, *, hashes: bool = True) -> list[str]:
    """Every problem found (empty when the checkpoint is intact): coverage, sizes, headers and,
    with hashes=True, the SHA-256 of every stored piece. Each problem names its file."""
    tag_dir, m = open_checkpoint(dir, tag)
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
    if not hashes or problems:
        return problems
    for fname in sorted(m.files):
        path = os.path.join(tag_dir, fname)
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, t in m.tensors.items():
                for f in t.fragments:
                    if (
                        f.file == fname
                        and f.sha256 is not None
                        and sha256_range(fd, f.byte_start, f.nbytes, path=path) != f.sha256
                    ):
                        problems.append(
                            f"{path}: SHA-256 mismatch in tensor {name!r} elements "
                            f"[{f.offset}, {f.offset + f.numel})"
                        )
        finally:
            os.close(fd)
    return problems


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
