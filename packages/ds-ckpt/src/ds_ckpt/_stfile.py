"""Reading and writing safetensors files by byte range, without loading whole files.

We write the format ourselves (8-byte little-endian header length, JSON header, raw data) rather
than through `safetensors.torch.save_file` so that (1) the data streams from the caller's
tensors to the file with no intermediate copy, (2) checksums (chunk XXH3-64s, optional SHA-256)
are computed while writing, and (3) byte positions are known before writing, for the
manifest. The files are ordinary safetensors files; tests open them with the safetensors
library.
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

from ds_ckpt._checksum import CHUNK_BYTES, PieceDigest, digest, digest_hex
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


def write_all(fd: int, view: memoryview) -> None:
    """os.write until every byte of `view` is written (writes may be partial)."""
    off = 0
    while off < len(view):
        off += os.write(fd, view[off : off + _CHUNK])


_DIRECT_BLOCK = 32 * 1024 * 1024  # bytes per write syscall (a multiple of the 4 KiB sector)
_DIRECT_MIN = 64 * 1024 * 1024  # smaller files go through the page cache
_WRITE_BUFFERS = 4  # bounce buffers: up to three writes in flight while the fourth fills
_WRITERS = 3
_SECTOR = 4096


def _aligned_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """A page-aligned uint8 CPU tensor: page-locked when a device will copy into it."""
    if pinned:
        try:
            t = torch.empty(nbytes + _SECTOR, dtype=torch.uint8, pin_memory=True)
            skip = -t.data_ptr() % _SECTOR
            return t[skip : skip + nbytes]
        except RuntimeError:  # no page-locked memory left: pageable copies are slower, not wrong
            pass
    import mmap

    # anonymous mappings are page-aligned; frombuffer keeps the mapping alive
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


class _StreamWriter:
    """Writes one file as a byte stream at increasing offsets through a few aligned buffers.

    Sources are copied into the buffers with ``Tensor.copy_``, so a device tensor goes straight
    from device memory into page-locked memory (no whole-checkpoint staging copy, host memory
    bounded by the buffers). Full buffers are written by a small pool while the next one
    fills; with O_DIRECT the tail is padded to the sector size and the file truncated after.
    A buffer is refilled only once its write and any hash reading it have finished.
    """

    def __init__(self, fd: int, total: int, *, direct: bool, pinned: bool) -> None:
        self.fd, self.direct = fd, direct
        self.block = min(_DIRECT_BLOCK, -(-max(total, 1) // _SECTOR) * _SECTOR)
        n = 1 if total <= self.block else _WRITE_BUFFERS
        self.bufs = [_aligned_buffer(self.block, pinned) for _ in range(n)]
        self.busy: list[list[Future]] = [[] for _ in range(n)]
        self.pool = ThreadPoolExecutor(min(_WRITERS, n), thread_name_prefix="ds-ckpt-write")
        self.cur = self.fill = self.off = 0

    def put(self, src: torch.Tensor, on_segment=None) -> None:
        """Append the bytes of the 1-D uint8 tensor `src` (any device). `on_segment(view)` may
        return a future that reads the buffered copy of each piece (a hash update)."""
        pos, n = 0, src.numel()
        while pos < n:
            k = min(self.block - self.fill, n - pos)
            seg = self.bufs[self.cur][self.fill : self.fill + k]
            seg.copy_(src[pos : pos + k])
            if on_segment is not None:
                self.busy[self.cur].append(on_segment(byte_view(seg)))
            self.fill += k
            pos += k
            if self.fill == self.block:
                self._submit(self.block)

    def _submit(self, nbytes: int) -> None:
        buf = self.bufs[self.cur]
        if self.direct and nbytes % _SECTOR:
            padded = -(-nbytes // _SECTOR) * _SECTOR
            buf[nbytes:padded].zero_()
            nbytes = padded
        self.busy[self.cur].append(
            self.pool.submit(_pwrite_all, self.fd, byte_view(buf[:nbytes]), self.off)
        )
        self.off += nbytes
        self.cur, self.fill = (self.cur + 1) % len(self.bufs), 0
        for f in self.busy[self.cur]:  # the next buffer must be drained before it refills
            f.result()
        self.busy[self.cur] = []

    def close(self, total: int) -> None:
        try:
            if self.fill:
                self._submit(self.fill)
            for fs in self.busy:
                for f in fs:
                    f.result()
            if self.direct:
                os.ftruncate(self.fd, total)
        finally:
            self.pool.shutdown()

    def abort(self) -> None:
        """Let in-flight writes and hashes finish (they read the buffers), keep no result."""
        for fs in self.busy:
            for f in fs:
                f.exception()
        self.pool.shutdown()


def _pwrite_all(fd: int, mv: memoryview, at: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], at + done)


def _digest_update(d: PieceDigest, view: memoryview, after: Future | None) -> None:
    if after is not None:  # updates of one piece must be applied in order
        after.result()
    d.update(view)


def write_file(
    path: str,
    entries: list[Entry],
    header: bytes,
    data: list[torch.Tensor],
    *,
    hash_pool: ThreadPoolExecutor | None = None,
    hashes: bool = True,
    direct: bool | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[int, list[tuple[str | None, str]], str]:
    """Write `header` then the bytes of each contiguous tensor of `data` (CPU or device);
    fsync; return (size, (sha256 or None, chunk digests) per entry, digest of the header bytes).

    The chunk digests (see _checksum) are always computed; SHA-256 only with hashes=True. Both run
    on `hash_pool` threads while the data is written (zlib, hashlib, the copies and the write
    syscalls release the GIL): a CPU tensor is digested whole from its own memory, a device
    tensor piece by piece from the buffered copy, in order. Large files are written with
    O_DIRECT (direct=None: when the file system allows it): no page-cache copy, no dirty-page
    throttling.
    """
    own_pool = hash_pool is None
    pool = hash_pool or ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="ds-ckpt-hash"
    )
    for e, t in zip(entries, data):
        if t.numel() != e.numel:
            raise ValueError(f"{path}: entry {e.key} expects {e.numel} elements")
        if not t.is_contiguous():
            raise ValueError(f"{path}: entry {e.key} is not contiguous")
    total = len(header) + sum(e.nbytes for e in entries)
    pinned = any(t.device.type != "cpu" for t in data)
    fd = _open_for_write(path, direct if direct is not None else total >= _DIRECT_MIN)
    whole: dict[int, Future] = {}
    chained: dict[int, tuple[PieceDigest, Future | None]] = {}
    try:
        out = _StreamWriter(fd, total, direct=_is_direct(fd), pinned=pinned)
        try:
            out.put(torch.frombuffer(bytearray(header), dtype=torch.uint8))
            for i, t in enumerate(data):
                flat = t.reshape(-1).view(torch.uint8)
                if t.device.type == "cpu":
                    whole[i] = pool.submit(digest, byte_view(flat), chunk_bytes, sha256=hashes)
                    out.put(flat)
                else:
                    chained[i] = (PieceDigest(chunk_bytes, sha256=hashes), None)

                    def seg(view: memoryview, i: int = i) -> Future:
                        d, prev = chained[i]
                        fut = pool.submit(_digest_update, d, view, prev)
                        chained[i] = (d, fut)
                        return fut

                    out.put(flat, seg)
        except BaseException:
            out.abort()
            raise
        out.close(total)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
        digests: list[tuple[str | None, str]] = [(None, "")] * len(entries)
        try:
            for i, f in whole.items():
                digests[i] = f.result()
            for i, (d, last) in chained.items():
                if last is not None:
                    last.result()
                digests[i] = d.finish()
        finally:
            if own_pool:
                pool.shutdown()
    return size, digests, digest_hex(header)


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


def read_header(path: str) -> tuple[int, dict[str, dict], str]:
    """(data start, header dict, digest of the header bytes) of a safetensors file, validated;
    errors name the file."""
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
    return 8 + n, header, digest_hex(head + raw)


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


# Linux: a pread that returns only what the page cache holds and never waits for the disk
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def pread_cached(fd: int, byte_start: int, view: memoryview) -> int:
    """How many bytes of `view` were filled from the page cache without waiting for the disk
    (a prefix; 0 when the first page is not cached, or where the platform or the file system
    has no such read). A miss may start the kernel's readahead of the range asked for."""
    if not _NOWAIT:
        return 0
    try:
        return os.preadv(fd, [view], byte_start, _NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT on this file system
        return 0


class DirectReader:
    """Reads byte ranges of large files with O_DIRECT, many at a time from a thread pool.

    Buffered preads of a cold file go through the page cache and its readahead one request at
    a time per thread; O_DIRECT requests of a few MiB from several threads keep the device's
    queue full instead. Each thread reads the sector-aligned cover of its range into its own
    aligned buffer and copies the wanted bytes out (memmove releases the GIL).
    """

    def __init__(self, max_bytes: int) -> None:
        import threading

        self.cap = -(-max_bytes // _SECTOR) * _SECTOR + 2 * _SECTOR
        self.local = threading.local()

    @staticmethod
    def open(path: str) -> int | None:
        """An O_DIRECT descriptor, or None where the file system refuses it (tmpfs)."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None

    def read(self, fd: int, byte_start: int, view: memoryview, *, path: str) -> None:
        n = len(view)
        if n + 2 * _SECTOR > self.cap:
            raise ValueError(f"DirectReader: {n} bytes exceed the {self.cap}-byte buffer")
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = _aligned_buffer(self.cap, pinned=False)
        lo = byte_start - byte_start % _SECTOR
        hi = -(-(byte_start + n) // _SECTOR) * _SECTOR
        mv = byte_view(buf)
        got = 0
        while lo + got < byte_start + n:
            k = os.preadv(fd, [mv[got : hi - lo]], lo + got)
            if k <= 0:
                raise CheckpointCorruptError(
                    f"{path}: unexpected end of file at byte {lo + got} (wanted bytes up to "
                    f"{byte_start + n}); the file is truncated"
                )
            got += k
        dst = (ctypes.c_char * n).from_buffer(view)
        ctypes.memmove(dst, buf.data_ptr() + (byte_start - lo), n)


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
