"""The fast checksums every checkpoint carries: CRC-32 per fixed-size chunk of each stored piece.

Why CRC-32 (zlib's, IEEE polynomial): it is in the standard library (no dependency), runs at
about 4 GB/s per core on the development machine (SHA-256: 1.8 GB/s) and releases the GIL, so
the read threads verify in parallel; and unlike a 64-bit hash it *guarantees* detection of any
error burst of up to 32 bits, so every flipped byte is caught, not merely almost every one.

Why chunks: a rank that loads part of a stored piece (another data-parallel degree, another
ZeRO stage) must be able to verify what it reads without reading the rest of the piece. Each
piece's bytes are cut into `chunk_bytes` chunks counted from the piece's first byte; a reader
verifies every chunk its range overlaps, reading at most one extra partial chunk at each end.
The manifest stores each piece's chunk CRCs as one hex string (8 characters per chunk).
"""

from __future__ import annotations

import hashlib
import zlib

ALGO = "crc32"
CHUNK_BYTES = 1 << 20  # 1 MiB: at most 2 MiB read in excess per range; 8 manifest bytes per MiB
_HEX = 8


def crc(data: memoryview | bytes, value: int = 0) -> int:
    """CRC-32 of `data` continuing from `value` (zlib.crc32, GIL released for large buffers)."""
    return zlib.crc32(data, value)


def crc_hex(data: memoryview | bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    return -(-nbytes // chunk_bytes)


def expected(crcs: str, k: int) -> str:
    """The stored CRC of chunk `k` (hex)."""
    return crcs[k * _HEX : (k + 1) * _HEX]


def check_crcs_field(crcs: object, nbytes: int, chunk_bytes: int) -> str | None:
    """What is wrong with a piece's CRC string (a damaged or foreign manifest), or None."""
    if not isinstance(crcs, str):
        return f"crc32 must be a hex string, got {type(crcs).__name__}"
    want = chunk_count(nbytes, chunk_bytes) * _HEX
    if len(crcs) != want:
        return f"crc32 holds {len(crcs) // _HEX} chunk CRCs, {want // _HEX} expected"
    return None


class PieceDigest:
    """Incremental digests of one stored piece, fed its bytes in order (possibly in segments of
    any size): the CRC of every `chunk_bytes` chunk and, optionally, the SHA-256 of it all."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, *, sha256: bool = False) -> None:
        self.chunk_bytes = chunk_bytes
        self.sha = hashlib.sha256() if sha256 else None
        self.crcs: list[str] = []
        self.cur = 0  # CRC of the open chunk so far
        self.fill = 0  # bytes in the open chunk

    def update(self, view: memoryview) -> None:
        if self.sha is not None:
            self.sha.update(view)
        pos, n = 0, len(view)
        while pos < n:
            k = min(self.chunk_bytes - self.fill, n - pos)
            self.cur = zlib.crc32(view[pos : pos + k], self.cur)
            self.fill += k
            pos += k
            if self.fill == self.chunk_bytes:
                self.crcs.append(f"{self.cur:08x}")
                self.cur = self.fill = 0

    def finish(self) -> tuple[str | None, str]:
        """(SHA-256 hex or None, concatenated chunk CRCs hex)."""
        if self.fill:
            self.crcs.append(f"{self.cur:08x}")
            self.cur = self.fill = 0
        return (self.sha.hexdigest() if self.sha is not None else None), "".join(self.crcs)


def digest(view: memoryview, chunk_bytes: int = CHUNK_BYTES, *, sha256: bool) -> tuple:
    """PieceDigest of a whole buffer at once (CPU tensors, hashed from their own memory)."""
    d = PieceDigest(chunk_bytes, sha256=sha256)
    d.update(view)
    return d.finish()
