"""XXH3-64 of byte ranges hashed outside the GIL.

The one-shot functions of `xxhash` before 4.0 (`xxh3_64_hexdigest`, ...) hold the GIL while
they hash (4.0 releases it for inputs over 64 KiB). A load verifies every byte in its eight
read threads, so with xxhash 3.x the hashing of a whole checkpoint ran one thread at a time
(1.5 GB at about 16 GB/s is 0.1 s, longer than a warm load of the unverified code on a 16-core
host). The package's extension module exports the C library's own entry points:
`XXH3_64bits_dispatch` (4.x, the CPU-dispatching variant its Python functions call) or
`XXH3_64bits` (3.x, the one they call). ctypes releases the GIL for the duration of a foreign
call, so each read thread hashes its own bytes in parallel with the others, whichever xxhash
is installed.

Nothing is assumed about that binding: at import it must reproduce the Python functions'
digests on inputs that take each of XXH3's code paths (0-16, 17-128, 129-240 bytes, one
partial and several whole blocks), or `NATIVE` stays None and `chunk_digests` uses the Python
functions, which give the same digests.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import xxhash

# Lengths that cover XXH3-64's branches: empty, 1-3, 4-8, 9-16, 17-128, 129-240 bytes, then
# long inputs (stripes of 64 bytes, blocks of 1024) with and without a partial stripe/block.
_PROBE_LENGTHS = (0, 1, 3, 4, 8, 9, 16, 17, 100, 128, 129, 200, 240, 241, 1024, 1025, 65_537)


def _bind() -> Callable[[int, int], int] | None:
    """The GIL-free XXH3-64 (address, length) -> digest, or None where it cannot be used."""
    try:
        from xxhash import _xxhash

        lib = ctypes.CDLL(_xxhash.__file__)
    except (ImportError, AttributeError, OSError, TypeError):
        return None  # no extension file to open (a frozen or statically linked interpreter)
    for name in ("XXH3_64bits_dispatch", "XXH3_64bits"):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = ctypes.c_uint64
        if _agrees(fn):
            return fn
    return None


def _agrees(fn: Callable[[int, int], int]) -> bool:
    """Whether `fn` gives xxhash's own digests (same algorithm, same calling convention)."""
    data = bytearray((i * 131 + 7) % 251 for i in range(max(_PROBE_LENGTHS) + 64))
    base = ctypes.addressof(ctypes.c_char.from_buffer(data))
    for n in _PROBE_LENGTHS:
        for shift in (0, 5):  # an unaligned start too
            want = xxhash.xxh3_64_intdigest(bytes(data[shift : shift + n]))
            if fn(base + shift, n) != want:
                return False
    return True


NATIVE = _bind()  # resolved once, at import; None: the Python functions (GIL held)


def chunk_digests(view: memoryview, chunk_bytes: int) -> str:
    """The concatenated hex XXH3-64 of each `chunk_bytes` chunk of the bytes of `view` (the
    last may be shorter), hashed in place without copying; outside the GIL when `view` is
    writable (the load's destinations and scratch buffers, the saved tensors)."""
    n = len(view)
    if NATIVE is not None and n and not view.readonly:
        anchor = ctypes.c_char.from_buffer(view)  # holds the buffer while its address is used
        base, h = ctypes.addressof(anchor), NATIVE
        return "".join(
            [f"{h(base + j, min(chunk_bytes, n - j)):016x}" for j in range(0, n, chunk_bytes)]
        )
    h = xxhash.xxh3_64_hexdigest
    return "".join([h(view[j : j + chunk_bytes]) for j in range(0, n, chunk_bytes)])
