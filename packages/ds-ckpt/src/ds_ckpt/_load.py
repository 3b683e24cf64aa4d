"""load(): each rank reads exactly the byte ranges of the fragments it asks for.

A request is matched by tensor name, so a checkpoint written at one layout (data-parallel degree,
ZeRO stage, pipeline stage count) loads at any other: the stored pieces overlapping the wanted
range are found by bisection and read with pread straight into the destination tensor.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ds_accel import get_accelerator, usable_cores
from ds_ckpt._checksum import ALGO, HEX, chunk_digests
from ds_ckpt._commit import complete_tags, resolve_tag
from ds_ckpt._dtypes import from_st, itemsize
from ds_ckpt._errors import CheckpointCorruptError, CheckpointMismatchError
from ds_ckpt._fragment import FragmentLike, check_fragments, global_numel
from ds_ckpt._jsonstate import decode
from ds_ckpt._manifest import MANIFEST, Manifest, TensorRecord, read_manifest
from ds_ckpt._plan import RangeIndex, Stored
from ds_ckpt._stfile import (
    _DIRECT_MIN,
    DirectReader,
    byte_view,
    pread_cached,
    pread_into,
    read_header,
    sha256_range,
)


def _read_threads(cores: int) -> int:
    """Read threads of a large load: one per usable core, at least 8 and at most 16.

    A cold load wants several requests in flight (8 keep a virtio or NVMe disk busy); a warm
    load is CPU-bound (the kernel's copy out of the page cache, then the checksum of the same
    bytes), so on a host with more cores more threads share that work: on 16 cores 8 threads
    left half of them idle while verification added a third to the warm load. More than 16
    has not been measured."""
    return max(8, min(16, cores))


# Reads: _READ_CHUNK-byte requests from _READ_THREADS threads, so several requests are in
# flight (one buffered stream stays at about dd's speed). Buffered preads by default: on the
# virtio disk of the H200 machine they loaded a 19 GB checkpoint at 1.56 GB/s against 1.37 for
# O_DIRECT requests of the same size and 1.44 for 32 x 1 MiB (benchmarks/results/
# ckpt-gpu-*-readpaths.json). _DIRECT_READS switches large files to the O_DIRECT reader for
# disks that prefer it.
_CORES = usable_cores()
_READ_THREADS = _read_threads(_CORES)
_READ_CHUNK = 16 * 1024 * 1024
_DIRECT_READS = False
_DIRECT_READ_MIN = 1024 * 1024  # below this a buffered pread is as good and copies less
# The part of a verified span that is already in the page cache is read in preads of
# _VERIFY_READ bytes (whole checksum chunks), each hashed while still in the CPU cache; the rest
# of the span is one pread, hashed after it (see _TaskRunner.run).
_VERIFY_READ = 1024 * 1024
# Loads check the chunk checksums of every byte they read. Only the benchmark turns this off, to
# time the read path without verification against the same code.
_VERIFY_CHECKSUMS = True
# Before a verified span is read, a one-byte RWF_NOWAIT pread asks whether it is in the page cache
# (see _TaskRunner.run): cached bytes then come in _VERIFY_READ preads, each hashed while in the
# CPU cache. That saves memory traffic where the read threads outnumber the cores (a 2-core host:
# warm load 0.175 s against 0.195 s without it, 1.5 GB). With a core per thread it costs more than
# it saves (16-core host: cold 0.698 s against 0.626 s, warm 0.051 against 0.049), so there every
# verified span is one pread, hashed after it. The benchmark flips it to time both.
_PROBE_CACHE = _CORES < _READ_THREADS

_log = logging.getLogger("ds_ckpt")


@dataclass
class _Task:
    """Read bytes [span_start, +span_len) of `file`, verify their chunk checksums, and deliver
    the wanted bytes [want_start, +len(view)) (inside the span) to `view`. The span is the
    wanted range widened to whole checksum chunks of the stored piece; when they differ (at most
    one chunk, at either end of a range) the span goes through a scratch buffer."""

    file: str
    span_start: int
    span_len: int
    want_start: int
    view: memoryview  # destination of the wanted bytes
    name: str
    stored: Stored
    itemsize: int
    chunk_bytes: int  # 0: no checksums to check (a version-1 checkpoint, or verification off)


# Staged reads (device, strided or cast destinations) go through two pinned buffers of this size
# in turn: the reads of one batch overlap the host-to-device copies of the previous one, and
# host memory stays bounded whatever the checkpoint size.
_STAGE_BYTES = 256 * 1024 * 1024


@dataclass
class _Unit:
    """A staged piece of a wanted fragment: elements [offset, +numel) of `name` -> `dst`."""

    name: str
    offset: int
    numel: int
    saved: torch.dtype
    dst: torch.Tensor


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
        start, header, header_hash = read_header(path)
        for name, fr in by_file[fname]:
            # Reads use numel * itemsize from the manifest: a record whose nbytes disagrees, or
            # whose range runs past the file, would read a neighbour's bytes without an error.
            try:
                isz = itemsize(from_st(m.tensors[name].dtype, what=f"tensor {name!r}"))
            except ValueError as e:
                raise CheckpointCorruptError(f"{tag_dir}/{MANIFEST}: {e}") from None
            if fr.nbytes != fr.numel * isz or fr.byte_start < start or fr.end > size:
                raise CheckpointCorruptError(
                    f"{tag_dir}/{MANIFEST}: tensor {name!r} elements [{fr.offset}, "
                    f"{fr.offset + fr.numel}) in {fname}: byte range [{fr.byte_start}, "
                    f"{fr.end}) does not fit {fr.numel} x {isz}-byte elements inside the "
                    f"{size}-byte file's data section; the manifest is corrupt"
                )
            if _header_range(header.get(fr.key)) != (fr.byte_start - start, fr.end - start):
                raise CheckpointCorruptError(
                    f"{path}: header entry {fr.key!r} (tensor {name!r}) does not match the "
                    "manifest's byte range; the file or the manifest is corrupt"
                )
        # after the structural checks (which say more precisely what is wrong): any other byte
        # of the header (dtype, shape, metadata, padding) differs from what was saved
        if m.verified and header_hash != m.headers.get(fname):
            raise CheckpointCorruptError(
                f"{path}: checksum ({ALGO}) mismatch in the safetensors header (bytes [0, "
                f"{start})): the file is corrupt; restore it or load an older tag"
            )


def _header_range(h: Any) -> tuple[int, int] | None:
    """The [start, end) data offsets of a header entry, or None when the entry is malformed
    (so a garbage header is reported as corruption of its file, not as a TypeError)."""
    if not isinstance(h, dict):
        return None
    offs = h.get("data_offsets")
    if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
        return None
    return offs[0], offs[1]


def load(
    dir: str | os.PathLike,
    tag: str | None = None,
    want: list[FragmentLike] = (),
    *,
    verify_hashes: bool = False,
    cast: bool = False,
) -> Any:
    """Fill each wanted fragment's tensor with its range of checkpoint `tag` (default: latest).

    Only the needed byte ranges are read, and every byte read is verified: the manifest's own
    checksum, each file's size and header checksum, and the XXH3-64 of every 1 MiB chunk of the
    stored pieces the ranges touch (a range that starts or ends inside a chunk reads that whole
    chunk). verify_hashes=True also checks the SHA-256 of every stored piece touched (reading
    whole pieces). A mismatch is a CheckpointCorruptError naming the file, the tensor and the
    elements. cast=True allows a destination dtype that differs from the saved one. Returns
    client_state. No collectives: every rank loads independently.
    """
    root = os.fspath(dir)
    t = resolve_tag(root, tag)
    try:
        return _load(root, t, want, verify_hashes=verify_hashes, cast=cast)
    except CheckpointCorruptError as e:
        raise CheckpointCorruptError(f"{e}{_other_tags_hint(root, t)}") from None


def warn_unverified(tag_dir: str, what: str, hint: str = "") -> None:
    """The one log line for a version-1 checkpoint, which has no checksums to verify."""
    _log.warning(
        "%s: saved by ds-ckpt < 0.1.3 without checksums, so %s (a corrupt byte could go "
        "unnoticed%s); save it again to add checksums",
        tag_dir,
        what,
        hint,
    )


def _other_tags_hint(root: str, bad: str) -> str:
    """Which complete tags a user could load instead (the error path only: reads manifests)."""
    tags = [t for _, t in complete_tags(root) if t != bad]
    if not tags:
        return f" (no other complete checkpoint in {root})"
    return f" (other complete tags in {root}, newest last: {tags[-3:]})"


def _load(root: str, tag: str, want: list[FragmentLike], *, verify_hashes: bool, cast: bool):
    tag_dir, m = open_checkpoint(root, tag)
    if not m.verified:
        warn_unverified(tag_dir, "this load is UNVERIFIED", "; verify_hashes=True checks SHA-256")
    chunk = m.chunk_bytes if m.verified and _VERIFY_CHECKSUMS else 0
    frags = check_fragments(want, for_load=True)
    indexes: dict[str, RangeIndex] = {}
    direct: list[_Task] = []
    units: list[_Unit] = []
    touched: dict[tuple[str, int], tuple[str, Stored]] = {}

    def tasks_for(name: str, offset: int, numel: int, isz: int, view: memoryview) -> list[_Task]:
        out = []
        for r in indexes[name].reads(offset, numel, isz):
            touched[(r.file, r.stored.byte_start)] = (name, r.stored)
            n = r.numel * isz
            out += _range_tasks(
                r.file,
                r.stored,
                r.byte_start,
                view[r.dst * isz : r.dst * isz + n],
                name,
                isz,
                chunk if r.stored.chunk_hashes is not None else 0,
            )
        return out

    for f in frags:
        rec = _record(m, tag_dir, f, cast)
        if f.name not in indexes:
            stored = [
                Stored(fr.file, fr.offset, fr.numel, fr.byte_start, fr.sha256, fr.chunk_hashes)
                for fr in rec.fragments
            ]
            try:
                indexes[f.name] = RangeIndex(f.name, global_numel(tuple(rec.shape)), stored)
            except ValueError as e:
                raise CheckpointCorruptError(f"{tag_dir}/manifest.json: {e}") from None
        saved = from_st(rec.dtype)
        isz = itemsize(saved)
        dst = f.tensor
        if dst.device.type == "cpu" and dst.is_contiguous() and saved == dst.dtype:
            direct += tasks_for(f.name, f.offset, f.numel, isz, byte_view(dst))
        else:
            step = max(1, _STAGE_BYTES // isz)
            for a in range(0, f.numel, step):
                k = min(step, f.numel - a)
                units.append(_Unit(f.name, f.offset + a, k, saved, dst[a : a + k]))
    files = {t.file for t in direct}
    for u in units:
        files |= {r.file for r in indexes[u.name].reads(u.offset, u.numel, 1)}
    _check_files(tag_dir, m, files)
    fds = {fn: os.open(os.path.join(tag_dir, fn), os.O_RDONLY) for fn in files}
    dfds = {
        fn: DirectReader.open(os.path.join(tag_dir, fn))
        for fn in files
        if _DIRECT_READS and m.files[fn] >= _DIRECT_MIN
    }
    run = _TaskRunner(tag_dir, fds, dfds, chunk).run
    pools: list[ThreadPoolExecutor] = []

    def run_all(tasks: list[_Task]) -> None:
        # Loads of one request or less (tiny models, a few small tensors, each rank's scalars)
        # run inline: starting eight threads would cost more than the reads.
        if sum(t.span_len for t in tasks) <= _READ_CHUNK:
            for t in tasks:
                run(t)
            return
        if not pools:
            pools.append(ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="ds-ckpt-read"))
        list(pools[0].map(run, tasks))

    try:
        run_all(direct)
        if units:
            _staged(units, tasks_for, run_all)
        if verify_hashes:
            for (fn, _), (name, st) in touched.items():
                nbytes = st.numel * itemsize(from_st(m.tensors[name].dtype))
                if st.sha256 is None:
                    raise CheckpointCorruptError(
                        f"{os.path.join(tag_dir, fn)}: saved without hashes (hashes=False); "
                        "load with verify_hashes=False"
                    )
                got = sha256_range(fds[fn], st.byte_start, nbytes, path=os.path.join(tag_dir, fn))
                if got != st.sha256:
                    raise CheckpointCorruptError(
                        f"{os.path.join(tag_dir, fn)}: SHA-256 mismatch in tensor {name!r} "
                        f"elements [{st.offset}, {st.offset + st.numel}); the file is corrupt; "
                        "restore it or load an older tag"
                    )
    finally:
        for pool in pools:
            pool.shutdown()
        for fd in [*fds.values(), *dfds.values()]:
            if fd is not None:
                os.close(fd)
    return decode(m.client_state)


class _TaskRunner:
    """Runs _Tasks from any thread: reads the span (into a per-thread scratch buffer when it is
    wider than the wanted range), verifies its chunk checksums, then delivers the wanted bytes."""

    def __init__(
        self, tag_dir: str, fds: dict[str, int], dfds: dict[str, int | None], chunk: int
    ) -> None:
        self.tag_dir, self.fds, self.dfds, self.chunk = tag_dir, fds, dfds, chunk
        self.reader = DirectReader(max(_READ_CHUNK, chunk))
        self.local = threading.local()

    def run(self, t: _Task) -> None:
        path = os.path.join(self.tag_dir, t.file)
        if t.span_start == t.want_start and t.span_len == len(t.view):
            buf = t.view
        else:
            scratch = getattr(self.local, "buf", None)
            if scratch is None or len(scratch) < t.span_len:
                scratch = self.local.buf = memoryview(bytearray(max(t.span_len, self.chunk)))
            buf = scratch[: t.span_len]
        dfd = self.dfds.get(t.file)
        if dfd is not None and len(buf) >= _DIRECT_READ_MIN:
            self.reader.read(dfd, t.span_start, buf, path=path)
            if t.chunk_bytes:
                _verify_span(t, buf, path)
        elif not t.chunk_bytes:
            pread_into(self.fds[t.file], t.span_start, buf, path=path)
        else:
            # Hash in this read thread, outside the GIL (the eight threads hash in parallel),
            # and compare the span's digests with the manifest's once. While the span's bytes
            # are in the page cache (a warm load) they come in small preads that never wait for
            # the disk, each hashed while still in the CPU cache (hashing 16 MiB after one pread
            # reads it back from memory: twice the CPU on the 2-core machine). The first byte
            # not cached ends that: the rest of the span is one pread, the very request the
            # unverified path makes, so the kernel's readahead and page cache work as without
            # verification (1 MiB preads after a WILLNEED, as 0.1.3 did, cost 0.65 CPU s more
            # per 1.5 GB on a 16-core host). The one-byte probe costs a cold span a one-page
            # read of its first page, which the big pread then finds in flight.
            fd, c = self.fds[t.file], t.chunk_bytes
            step = max(c, _VERIFY_READ // c * c)
            got, j = [], 0
            if _PROBE_CACHE and pread_cached(fd, t.span_start, buf[:1]) == 1:
                while j < t.span_len:
                    part = buf[j : j + step]
                    if pread_cached(fd, t.span_start + j, part) != len(part):
                        break  # (a partial read is read again below)
                    got.append(chunk_digests(part, c))
                    j += len(part)
            if j < t.span_len:
                pread_into(fd, t.span_start + j, buf[j:], path=path)
                got.append(chunk_digests(buf[j:], c))
            _check_digests(t, "".join(got), path)
        if buf is not t.view:
            lo = t.want_start - t.span_start
            t.view[:] = buf[lo : lo + len(t.view)]


def _range_tasks(
    file: str,
    s: Stored,
    a: int,
    view: memoryview,
    name: str,
    isz: int,
    chunk: int,
) -> list[_Task]:
    """Tasks reading bytes [a, a + len(view)) of stored piece `s` into `view`.

    Without checksums (chunk 0): requests of _READ_CHUNK bytes. With them: the range is widened
    to the piece's chunk boundaries; a partial chunk at either end is its own task (read whole
    into scratch, verified, the wanted part copied out), the whole chunks in between are read
    straight into `view` in requests of about _READ_CHUNK bytes and verified there.
    """
    b = a + len(view)
    if not chunk:
        return [
            _Task(
                file,
                a + c,
                min(_READ_CHUNK, b - a - c),
                a + c,
                view[c : c + _READ_CHUNK],
                name,
                s,
                isz,
                0,
            )
            for c in range(0, b - a, _READ_CHUNK)
        ]
    base, end = s.byte_start, s.byte_start + s.numel * isz

    def floor(x: int) -> int:  # start of the chunk holding byte x
        return base + (x - base) // chunk * chunk

    out: list[_Task] = []
    pos = a
    head = floor(a)
    if head != a:  # the range starts inside a chunk
        ce = min(head + chunk, end)
        wb = min(b, ce)
        out.append(_Task(file, head, ce - head, a, view[: wb - a], name, s, isz, chunk))
        pos = wb
    whole_end = b if b == end or (b - base) % chunk == 0 else floor(b)
    step = max(chunk, _READ_CHUNK // chunk * chunk)
    for x in range(pos, whole_end, step):
        y = min(whole_end, x + step)
        out.append(_Task(file, x, y - x, x, view[x - a : y - a], name, s, isz, chunk))
    pos = max(pos, whole_end)
    if pos < b:  # the range ends inside a chunk (pos is that chunk's start)
        ce = min(pos + chunk, end)
        out.append(_Task(file, pos, ce - pos, pos, view[pos - a :], name, s, isz, chunk))
    return out


def _verify_span(t: _Task, buf: memoryview, path: str) -> None:
    """Check the chunk checksums of a whole span read into `buf` (O_DIRECT reads)."""
    _check_digests(t, chunk_digests(buf, t.chunk_bytes), path)


def _check_digests(t: _Task, got: str, path: str) -> None:
    """Compare the concatenated digests of the chunks of span `t` with the manifest's in one
    string comparison; only a mismatch looks for the chunk, to name it."""
    s, c = t.stored, t.chunk_bytes
    first = (t.span_start - s.byte_start) // c
    want = s.chunk_hashes[first * HEX : first * HEX + len(got)]
    if got == want:
        return
    bad = next(i for i in range(0, len(got), HEX) if got[i : i + HEX] != want[i : i + HEX])
    k = first + bad // HEX
    size = min(c, t.span_len - (k - first) * c)
    at = s.byte_start + k * c
    e0 = s.offset + (k * c) // t.itemsize
    e1 = s.offset + (k * c + size) // t.itemsize
    raise CheckpointCorruptError(
        f"{path}: checksum ({ALGO}) mismatch in tensor {t.name!r}, elements [{e0}, "
        f"{e1}) (file bytes [{at}, {at + size})): the file is corrupt; restore it or "
        "load an older tag"
    )


def _staged(units: list[_Unit], tasks_for, run_all) -> None:
    """Read units into two alternating pinned buffers and copy each batch to its destinations
    while the next batch is read."""
    on_device = any(u.dst.device.type != "cpu" for u in units)
    size = min(_STAGE_BYTES, sum(-(-u.numel * itemsize(u.saved) // 64) * 64 for u in units))
    bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=on_device) for _ in range(2)]
    done: list[Any] = [None, None]  # event marking the end of each buffer's last copies
    batch: list[_Unit] = []
    used = 0
    turn = 0

    def flush() -> None:
        nonlocal turn, used, batch
        buf = bufs[turn]
        if done[turn] is not None:
            done[turn].synchronize()  # its previous copies must finish before it is refilled
        pos, views = 0, []
        tasks: list[_Task] = []
        for u in batch:
            v = buf[pos : pos + u.numel * itemsize(u.saved)].view(u.saved)
            tasks += tasks_for(u.name, u.offset, u.numel, itemsize(u.saved), byte_view(v))
            views.append(v)
            pos += -(-u.numel * itemsize(u.saved) // 64) * 64
        run_all(tasks)
        for u, v in zip(batch, views):
            u.dst.copy_(v, non_blocking=u.dst.device.type != "cpu")
        if on_device:
            done[turn] = get_accelerator().Event()
            done[turn].record()
        turn, used, batch = 1 - turn, 0, []

    for u in units:
        nbytes = -(-u.numel * itemsize(u.saved) // 64) * 64
        if batch and used + nbytes > size:
            flush()
        batch.append(u)
        used += nbytes
    if batch:
        flush()
    if on_device:
        get_accelerator().synchronize()


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
