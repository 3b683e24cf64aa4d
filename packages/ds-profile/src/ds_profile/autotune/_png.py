"""A bar chart as a PNG with no plotting library: one bar per trial, height = its metric
relative to the best, green for the best, blue for the rest, red stubs for failed trials and
orange stubs for trials stopped by the session's time limit, grey stubs for configurations the
memory estimator ruled out (never launched). Labels live in
the table next to it (same order)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

_COLORS = {
    "best": (46, 160, 67),
    "ok": (52, 110, 200),
    "failed": (210, 50, 50),
    "timeout": (235, 150, 30),
    "rejected": (160, 160, 160),
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bar_chart_png(
    bars: Sequence[tuple[str, float]], height: int = 240, bar_w: int = 14, gap: int = 4
) -> bytes:
    """``bars``: (status, fraction of the tallest in [0, 1]) per trial, status one of
    best/ok/failed/timeout/rejected."""
    width = max(1, len(bars)) * (bar_w + gap) + gap
    rows = [bytearray([255] * (3 * width)) for _ in range(height)]
    for i, (status, frac) in enumerate(bars):
        color = _COLORS[status]
        h = max(3, int(round(min(1.0, max(0.0, frac)) * (height - 10))))
        x0 = gap + i * (bar_w + gap)
        for y in range(height - h, height):
            row = rows[y]
            for x in range(x0, x0 + bar_w):
                row[3 * x : 3 * x + 3] = bytes(color)
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )
