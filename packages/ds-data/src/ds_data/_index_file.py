"""Index files: rows of integers in DeepSpeed's memory-mapped indexed format (no pickle).

A file pair ``<prefix>.bin`` / ``<prefix>.idx`` holds a list of 1-D integer rows: ``.bin`` is the
rows' raw little-endian values back to back; ``.idx`` is the header ``MMIDIDX\\0\\0``, version
(u64 = 1), dtype code (u8), row count (u64), document count (u64), then the rows' lengths
(int32), their byte offsets in ``.bin`` (int64) and the document boundaries (int64). It is the
format DeepSpeed's DataAnalyzer writes and its sampler reads, so index files move between the two
unchanged (the tests compare bytes).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["IndexedRows", "find_fit_int_dtype", "write_rows"]

_MAGIC = b"MMIDIDX\x00\x00"
_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.uint16, 7: np.uint32, 8: np.uint64}  # fmt: skip
_CODE_OF = {np.dtype(t): c for c, t in _CODES.items()}


def find_fit_int_dtype(min_value: int, max_value: int) -> type:
    """The smallest integer dtype holding [min_value, max_value] (DeepSpeed's choice)."""
    if min_value >= 0:
        for dtype, top in ((np.uint8, 255), (np.uint16, 65535), (np.uint32, 4294967295)):
            if max_value <= top:
                return dtype
        return np.uint64
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= min_value and max_value <= info.max:
            return dtype
    return np.int64


def write_rows(prefix: str | os.PathLike, rows: Iterable[np.ndarray], dtype,
               documents: Sequence[int] | None = None) -> None:  # fmt: skip
    """Writes ``rows`` as ``prefix.bin``/``prefix.idx`` (through temporary names, then renamed,
    so a reader never sees half a file). ``documents``: the document boundaries to record
    (default ``[0, len(rows)]``; readers here ignore them)."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise ValueError(
            f"index files hold integers; {dtype} is not one of {sorted(map(str, _CODE_OF))}"
        )
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    tmp_bin, tmp_idx = (
        prefix.with_name(prefix.name + ".bin.tmp"),
        prefix.with_name(prefix.name + ".idx.tmp"),
    )
    with open(tmp_bin, "wb") as f:
        for row in rows:
            data = np.ascontiguousarray(np.asarray(row).reshape(-1).astype(dtype, copy=False))
            f.write(data.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            sizes.append(int(data.size))
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if sizes:
        pointers[1:] = np.cumsum(np.asarray(sizes[:-1], dtype=np.int64) * dtype.itemsize)
    doc_idx = np.asarray([0, len(sizes)] if documents is None else documents, dtype=np.int64)
    with open(tmp_idx, "wb") as f:
        f.write(_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(sizes, dtype="<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())
    os.replace(tmp_bin, prefix.with_name(prefix.name + ".bin"))
    os.replace(tmp_idx, prefix.with_name(prefix.name + ".idx"))


class IndexedRows(Sequence[np.ndarray]):
    """Read-only rows of an index file pair, memory-mapped; ``rows[i]`` is a 1-D array."""

    prefix: Path
    dtype: np.dtype

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        idx = self.prefix.with_name(self.prefix.name + ".idx")
        binary = self.prefix.with_name(self.prefix.name + ".bin")
        if not idx.is_file() or not binary.is_file():
            raise FileNotFoundError(
                f"index file {self.prefix} needs {idx.name} and {binary.name} (as written by "
                f"DataAnalyzer.run_reduce); check the configured path"
            )
        header = idx.read_bytes()
        if header[:9] != _MAGIC:
            raise ValueError(f"{idx} is not an indexed-rows file (magic {header[:9]!r})")
        (version,) = struct.unpack_from("<Q", header, 9)
        (code,) = struct.unpack_from("<B", header, 17)
        count, docs = struct.unpack_from("<QQ", header, 18)
        if version != 1 or code not in _CODES:
            raise ValueError(f"{idx}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(_CODES[code]).newbyteorder("<")
        offset = 34
        self._sizes = np.frombuffer(header, dtype="<i4", count=count, offset=offset)
        self._pointers = np.frombuffer(header, dtype="<i8", count=count, offset=offset + 4 * count)
        self._docs = np.frombuffer(header, dtype="<i8", count=docs, offset=offset + 12 * count)
        size = binary.stat().st_size
        self._data = np.memmap(binary, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)} in {self.prefix}")
        start = int(self._pointers[i])
        return np.frombuffer(self._data, dtype=self.dtype, count=int(self._sizes[i]), offset=start)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes
