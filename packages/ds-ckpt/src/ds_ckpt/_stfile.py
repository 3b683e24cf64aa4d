"""Reading and writing safetensors files by byte range, without loading whole files.

We write the format ourselves (8-byte little-endian header length, JSON header, raw data) rather
than through `safetensors.torch.save_file` so that (1) the data streams from the caller's
tensors to the file with no intermediate copy, (2) SHA-256 is computed while writing, and
(3) byte positions are known before writing, for the manifest. The files are ordinary
safetensors files; tests open them with the safetensors library.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ds_ckpt._errors import CheckpointCorruptError

# The data section starts on a page boundary: aligned reads are cheaper and O_DIRECT-ready.
_ALIGN = 4096
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors limit; a larger value means a corrupt file
_CHUNK = 64 * 1024 * 1024  # bytes per write/read syscall and per hash update


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no numpy, no copy).

    The caller keeps `t` alive for as long as the view is used.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file as laid out in it."""

    key: str
    dtype: str
    numel: int
    itemsize: int
    byte_start: int  # absolute offset in the file

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def layout(
    entries: list[tuple[str, str, int, int]], shapes: list[list[int]] | None = None
) -> tuple[bytes, list[Entry]]:
    """Header bytes (length prefix included) and absolute positions for (key, dtype, numel,
    itemsize) entries, in order; shapes default to 1-D."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "ds-ckpt"}}
    pos = 0
    rel = []
    for i, (key, dtype, numel, isz) in enumerate(entries):
        shape = shapes[i] if shapes is not None else [numel]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + numel * isz]}
        rel.append(pos)
        pos += numel * isz
    raw = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(raw)) // _ALIGN) * _ALIGN - 8
    raw = raw + b" " * (padded - len(raw))  # safetensors allows trailing spaces in the header
    start = 8 + len(raw)
    out = [Entry(k, d, n, isz, start + r) for (k, d, n, isz), r in zip(entries, rel)]
    return struct.pack("<Q", len(raw)) + raw, out


def _write_all(fd: int, view: memoryview) -> None:
    off = 0
    while off < len(view):
        off += os.write(fd, view[off : off + _CHUNK])


def _sha256(view: memoryview) -> str:
    h = hashlib.sha256()
    for off in range(0, len(view), _CHUNK):
        h.update(view[off : off + _CHUNK])
    return h.hexdigest()


_DIRECT_BLOCK = 64 * 1024 * 1024  # O_DIRECT bounce-buffer size (a multiple of the 4 KiB sector)
_DIRECT_MIN = 64 * 1024 * 1024  # smaller files go through the page cache


def write_file(
    path: str,
    entries: list[Entry],
    header: bytes,
    data: list[torch.Tensor],
    *,
    hash_pool: ThreadPoolExecutor | None = None,
    hashes: bool = True,
    direct: bool | None = None,
) -> tuple[int, list[str | None]]:
    """Write `header` then each CPU tensor of `data`; fsync; return (size, sha256 per entry,
    None for each when hashes=False).

    Hashing runs on `hash_pool` threads while the data is written: hashlib and the write
    syscalls release the GIL, so the two overlap instead of adding up. Large files are written
    with O_DIRECT through two aligned bounce buffers (direct=None: when the file system allows
    it), which skips the page cache: no copy into it, no dirty-page throttling.
    """
    own_pool = hash_pool is None
    pool = hash_pool or ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="ds-ckpt-hash"
    )
    futures = []
    views = []
    for e, t in zip(entries, data):
        if t.numel() != e.numel:
            raise ValueError(f"{path}: entry {e.key} expects {e.numel} elements")
        views.append(byte_view(t))
    total = len(header) + sum(len(v) for v in views)
    fd = _open_for_write(path, direct if direct is not None else total >= _DIRECT_MIN)
    try:
        if hashes:
            futures = [pool.submit(_sha256, v) for v in views]
        if _is_direct(fd):
            _write_direct(fd, [memoryview(header), *views], total)
        else:
            _write_all(fd, memoryview(header))
            for v in views:
                _write_all(fd, v)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
        digests: list[str | None] = [f.result() for f in futures] or [None] * len(entries)
        if own_pool:
            pool.shutdown()
    return size, digests


def _open_for_write(path: str, direct: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:  # tmpfs and some network file systems refuse O_DIRECT
            pass
    return os.open(path, flags, 0o644)


def _is_direct(fd: int) -> bool:
    import fcntl

    return hasattr(os, "O_DIRECT") and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _write_direct(fd: int, chunks: list[memoryview], total: int) -> None:
    """Stream `chunks` through two page-aligned buffers; full blocks are written by a thread
    while the other buffer fills; the tail is padded to 4 KiB, then the file is truncated."""
    import mmap

    bufs = [mmap.mmap(-1, _DIRECT_BLOCK) for _ in range(2)]
    mvs = [memoryview(b) for b in bufs]
    writer = ThreadPoolExecutor(1, thread_name_prefix="ds-ckpt-odirect")
    pending: list[Future | None] = [None, None]
    cur = fill = off = 0

    def pwrite_all(mv: memoryview, at: int) -> None:
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], at + done)

    try:
        for chunk in chunks:
            pos = 0
            while pos < len(chunk):
                k = min(_DIRECT_BLOCK - fill, len(chunk) - pos)
                mvs[cur][fill : fill + k] = chunk[pos : pos + k]
                fill += k
                pos += k
                if fill == _DIRECT_BLOCK:
                    pending[cur] = writer.submit(pwrite_all, mvs[cur], off)
                    off += _DIRECT_BLOCK
                    cur, fill = 1 - cur, 0
                    if pending[cur] is not None:
                        pending[cur].result()  # the buffer must be written before refilling
                        pending[cur] = None
        if fill:
            padded = -(-fill // 4096) * 4096
            mvs[cur][fill:padded] = bytes(padded - fill)
            pending[cur] = writer.submit(pwrite_all, mvs[cur][:padded], off)
        for f in pending:
            if f is not None:
                f.result()
        os.ftruncate(fd, total)
    finally:
        writer.shutdown()
        for mv in mvs:
            mv.release()
        for b in bufs:
            b.close()


def read_header(path: str) -> tuple[int, dict[str, dict]]:
    """(data start, header dict) of a safetensors file, validated; errors name the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointCorruptError(f"{path}: file too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointCorruptError(
                    f"{path}: header length {n} is implausible; the file is not safetensors or "
                    "is corrupt"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path}: file is missing; the checkpoint is incomplete "
            "(restore the file or load an older tag)"
        ) from None
    if len(raw) < n:
        raise CheckpointCorruptError(f"{path}: truncated inside its header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointCorruptError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, header


def pread_into(fd: int, byte_start: int, view: memoryview, *, path: str) -> None:
    """Fill `view` from `fd` at `byte_start`; a short read means the file was truncated."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got : got + _CHUNK]], byte_start + got)
        if n <= 0:
            raise CheckpointCorruptError(
                f"{path}: unexpected end of file at byte {byte_start + got} (wanted "
                f"{len(view) - got} more bytes); the file is truncated"
            )
        got += n


def sha256_range(fd: int, byte_start: int, nbytes: int, *, path: str) -> str:
    """SHA-256 of a byte range of an open file, read in bounded chunks."""
    h = hashlib.sha256()
    buf = bytearray(min(nbytes, _CHUNK))
    mv = memoryview(buf)
    done = 0
    while done < nbytes:
        k = min(len(buf), nbytes - done)
        pread_into(fd, byte_start + done, mv[:k], path=path)
        h.update(mv[:k])
        done += k
    return h.hexdigest()
