"""load(): each rank reads exactly the byte ranges of the fragments it asks for.

A request is matched by tensor name, so a checkpoint written at one layout (data-parallel degree,
ZeRO stage, pipeline stage count) loads at any other: the stored pieces overlapping the wanted
range are found by bisection and read with pread straight into the destination tensor.
"""

from __future__ import annotations

import difflib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ds_ckpt._commit import resolve_tag
from ds_ckpt._dtypes import from_st, itemsize
from ds_ckpt._errors import CheckpointCorruptError, CheckpointMismatchError
from ds_ckpt._fragment import FragmentLike, check_fragments, global_numel
from ds_ckpt._jsonstate import decode
from ds_ckpt._manifest import Manifest, TensorRecord, read_manifest
from ds_ckpt._plan import RangeIndex, Read, Stored
from ds_ckpt._stfile import _CHUNK, byte_view, pread_into, read_header, sha256_range

_READ_THREADS = 4


@dataclass
class _Task:
    read: Read
    view: memoryview  # destination bytes
    name: str


class _Staging:
    """One host buffer (pinned when a destination is on a device) carved into the staging
    slices of all fragments that cannot be read into directly: one allocation, not one each."""

    def __init__(self, frags: list[FragmentLike], m: Manifest) -> None:
        need = 0
        pinned = False
        for f in frags:
            rec = m.tensors.get(f.name)
            if rec is None:
                continue
            saved = from_st(rec.dtype, what=f.name)
            t = f.tensor
            if not (t.device.type == "cpu" and t.is_contiguous() and saved == t.dtype):
                need += -(-f.numel * itemsize(saved) // 64) * 64
                pinned |= t.device.type != "cpu"
        self.buf = torch.empty(need, dtype=torch.uint8, pin_memory=pinned and need > 0)
        self.pos = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        n = numel * itemsize(dtype)
        out = self.buf[self.pos : self.pos + n].view(dtype)
        self.pos += -(-n // 64) * 64  # keep every slice aligned for any dtype view
        return out


def open_checkpoint(dir: str | os.PathLike, tag: str | None = None) -> tuple[str, Manifest]:
    """(tag directory, manifest) of `tag`, or of `latest` with fallback when tag is None."""
    root = os.fspath(dir)
    t = resolve_tag(root, tag)
    tag_dir = os.path.join(root, t)
    return tag_dir, read_manifest(tag_dir)


def _record(m: Manifest, tag_dir: str, f: FragmentLike, cast: bool) -> TensorRecord:
    rec = m.tensors.get(f.name)
    if rec is None:
        close = difflib.get_close_matches(f.name, list(m.tensors), n=3)
        hint = f"; similar names: {close}" if close else ""
        raise CheckpointMismatchError(
            f"tensor {f.name!r} is not in checkpoint {tag_dir} ({len(m.tensors)} tensors)"
            f"{hint}; check the parameter naming or load with a matching model"
        )
    shape = tuple(int(s) for s in f.global_shape)
    # A scalar saved as () or (1,) is the same one element (optimizer.step.* conventions vary).
    scalar_like = global_numel(shape) == 1 == global_numel(tuple(rec.shape)) and len(shape) <= 1
    if list(shape) != rec.shape and not (scalar_like and len(rec.shape) <= 1):
        raise CheckpointMismatchError(
            f"tensor {f.name!r}: checkpoint {tag_dir} holds shape {rec.shape}, the destination "
            f"wants {list(shape)}; the model definitions differ"
        )
    saved = from_st(rec.dtype, what=f.name)
    if saved != f.dtype and not cast:
        raise CheckpointMismatchError(
            f"tensor {f.name!r}: checkpoint {tag_dir} holds {saved}, the destination is "
            f"{f.dtype}; pass cast=True to convert on load"
        )
    return rec


def _check_files(tag_dir: str, m: Manifest, files: set[str]) -> None:
    """Sizes always, and each stored piece's position against the file's own header."""
    by_file: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for name, t in m.tensors.items():
        for fr in t.fragments:
            if fr.file in files:
                by_file[fr.file].append((name, fr))
    for fname in files:
        path = os.path.join(tag_dir, fname)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"{path}: file is missing from the checkpoint (the manifest lists it); restore "
                "it or load another tag"
            ) from None
        if size != m.files[fname]:
            raise CheckpointCorruptError(
                f"{path}: size {size} bytes, the manifest says {m.files[fname]}; the file is "
                "truncated or was replaced"
            )
        start, header = read_header(path)
        for name, fr in by_file[fname]:
            h = header.get(fr.key)
            if (
                h is None
                or start + h["data_offsets"][0] != fr.byte_start
                or h["data_offsets"][1] - h["data_offsets"][0] != fr.nbytes
            ):
                raise CheckpointCorruptError(
                    f"{path}: header entry {fr.key!r} (tensor {name!r}) does not match the "
                    "manifest's byte range; the file or the manifest is corrupt"
                )


def load(
    dir: str | os.PathLike,
    tag: str | None = None,
    want: list[FragmentLike] = (),
    *,
    verify_hashes: bool = False,
    cast: bool = False,
) -> Any:
    """Fill each wanted fragment's tensor with its range of checkpoint `tag` (default: latest).

    Only the needed byte ranges are read. Sizes and header positions of the files read are
    always checked; verify_hashes=True also checks the SHA-256 of every stored piece touched.
    cast=True allows a destination dtype that differs from the saved one. Returns client_state.
    No collectives: every rank loads independently.
    """
    tag_dir, m = open_checkpoint(dir, tag)
    frags = check_fragments(want, for_load=True)
    indexes: dict[str, RangeIndex] = {}
    tasks: list[_Task] = []
    finish: list[tuple[torch.Tensor, torch.Tensor]] = []  # (staging, destination) copies
    touched: dict[tuple[str, int], tuple[str, Stored]] = {}
    staging = _Staging(frags, m)
    for f in frags:
        rec = _record(m, tag_dir, f, cast)
        if f.name not in indexes:
            stored = [
                Stored(fr.file, fr.offset, fr.numel, fr.byte_start, fr.sha256)
                for fr in rec.fragments
            ]
            try:
                indexes[f.name] = RangeIndex(f.name, global_numel(tuple(rec.shape)), stored)
            except ValueError as e:
                raise CheckpointCorruptError(f"{tag_dir}/manifest.json: {e}") from None
        saved = from_st(rec.dtype)
        dst = f.tensor
        if dst.device.type == "cpu" and dst.is_contiguous() and saved == dst.dtype:
            buf = dst  # read straight into the destination
        else:  # a device, strided or cast destination: through one shared staging buffer
            buf = staging.take(f.numel, saved)
            finish.append((buf, dst))
        view = byte_view(buf)
        isz = itemsize(saved)
        for r in indexes[f.name].reads(f.offset, f.numel, isz):
            touched[(r.file, r.stored.byte_start)] = (f.name, r.stored)
            for c in range(0, r.numel * isz, _CHUNK):  # chunks let threads share a big read
                n = min(_CHUNK, r.numel * isz - c)
                tasks.append(
                    _Task(
                        Read(r.file, r.byte_start + c, n, 0, r.stored),
                        view[r.dst * isz + c : r.dst * isz + c + n],
                        f.name,
                    )
                )
    files = {t.read.file for t in tasks}
    _check_files(tag_dir, m, files)
    fds = {fn: os.open(os.path.join(tag_dir, fn), os.O_RDONLY) for fn in files}
    try:

        def run(t: _Task) -> None:
            pread_into(
                fds[t.read.file], t.read.byte_start, t.view, path=os.path.join(tag_dir, t.read.file)
            )

        if len(tasks) > 1:
            with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="ds-ckpt-read") as pool:
                list(pool.map(run, tasks))
        else:
            for t in tasks:
                run(t)
        if verify_hashes:
            for (fn, _), (name, s) in touched.items():
                nbytes = s.numel * itemsize(from_st(m.tensors[name].dtype))
                got = sha256_range(fds[fn], s.byte_start, nbytes, path=fn)
                if got != s.sha256:
                    raise CheckpointCorruptError(
                        f"{os.path.join(tag_dir, fn)}: SHA-256 mismatch in tensor {name!r} "
                        f"elements [{s.offset}, {s.offset + s.numel}); the file is corrupt; "
                        "restore it or load an older tag"
                    )
    finally:
        for fd in fds.values():
            os.close(fd)
    for buf, dst in finish:
        dst.copy_(buf, non_blocking=dst.device.type != "cpu")
    if any(dst.device.type == "cuda" for _, dst in finish):
        torch.cuda.synchronize()  # the staging buffer must outlive the async copies
    return decode(m.client_state)


def load_rank_state(dir: str | os.PathLike, tag: str | None = None, rank: int = 0) -> Any:
    """The rank_state saved by `rank` (per-rank RNG states, ...), or None if it saved none."""
    _, m = open_checkpoint(dir, tag)
    return decode(m.rank_states.get(str(rank)))


def load_tensor(
    dir: str | os.PathLike, name: str, tag: str | None = None, *, verify_hashes: bool = False
) -> torch.Tensor:
    """One whole tensor of a checkpoint, in its saved dtype and shape (for tools and tests)."""
    from ds_ckpt._fragment import Fragment

    tag_dir, m = open_checkpoint(dir, tag)
    rec = m.tensors.get(name)
    if rec is None:
        raise CheckpointMismatchError(f"tensor {name!r} is not in checkpoint {tag_dir}")
    out = torch.empty(rec.shape, dtype=from_st(rec.dtype))
    load(dir, os.path.basename(tag_dir), [Fragment.whole(name, out)], verify_hashes=verify_hashes)
    return out
