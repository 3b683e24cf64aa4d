"""Range arithmetic: who writes which elements on save, and which bytes a reader needs on load.

Pure functions over integers, so the resharding math is tested without files or processes.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class HeldRange:
    """A range of a global tensor that one rank holds (one of its fragments)."""

    rank: int
    index: int  # position of the fragment in that rank's list
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    offset: int
    numel: int


@dataclass(frozen=True)
class Piece:
    """A sub-range of a held fragment that its rank writes: each global element is written once."""

    rank: int
    index: int
    name: str
    offset: int  # global element offset
    numel: int


def plan_writes(held: list[HeldRange]) -> dict[int, list[Piece]]:
    """Assign every element of every tensor to exactly one holder, the lowest (rank, index).

    Replicated copies (ZeRO stage 0/1 weights on every rank) are thereby written once, by the
    lowest rank holding them, so the checkpoint holds one model whatever the replication. Raises
    when ranks disagree on a tensor's shape/dtype or when some elements are held by nobody,
    since such a checkpoint could not be loaded back in full.
    """
    by_name: dict[str, list[HeldRange]] = defaultdict(list)
    for h in held:
        by_name[h.name].append(h)
    out: dict[int, list[Piece]] = defaultdict(list)
    for name, ranges in by_name.items():
        first = ranges[0]
        for h in ranges[1:]:
            if h.shape != first.shape or h.dtype != first.dtype:
                raise ValueError(
                    f"tensor {name!r}: rank {first.rank} holds shape {list(first.shape)} "
                    f"{first.dtype} but rank {h.rank} holds shape {list(h.shape)} {h.dtype}; "
                    "every rank must describe the same global tensor"
                )
        total = 1
        for s in first.shape:
            total *= s
        for p in _assign(name, [h for h in ranges if h.numel > 0]):
            out[p.rank].append(p)
        _check_covered(name, total, [h for h in ranges if h.numel > 0])
    return dict(out)


def _assign(name: str, ranges: list[HeldRange]) -> list[Piece]:
    """Sweep the breakpoints; each elementary segment goes to the minimal covering holder."""
    points = sorted({h.offset for h in ranges} | {h.offset + h.numel for h in ranges})
    starts = sorted(ranges, key=lambda h: h.offset)
    active: list[tuple[int, int, int, HeldRange]] = []  # (rank, index, end, holder) min-heap
    pieces: list[Piece] = []
    j = 0
    for a, b in zip(points, points[1:]):
        while j < len(starts) and starts[j].offset <= a:
            h = starts[j]
            heapq.heappush(active, (h.rank, h.index, h.offset + h.numel, h))
            j += 1
        while active and active[0][2] <= a:
            heapq.heappop(active)
        if not active:
            continue  # a gap: _check_covered reports it
        owner = active[0][3]
        last = pieces[-1] if pieces else None
        if (
            last
            and last.rank == owner.rank
            and last.index == owner.index
            and last.offset + last.numel == a
        ):
            pieces[-1] = Piece(owner.rank, owner.index, name, last.offset, last.numel + b - a)
        else:
            pieces.append(Piece(owner.rank, owner.index, name, a, b - a))
    return pieces


def _check_covered(name: str, total: int, ranges: list[HeldRange]) -> None:
    pos = 0
    for h in sorted(ranges, key=lambda h: h.offset):
        if h.offset > pos:
            break
        pos = max(pos, h.offset + h.numel)
    if pos < total:
        nxt = min((h.offset for h in ranges if h.offset > pos), default=total)
        raise ValueError(
            f"tensor {name!r}: elements [{pos}, {nxt}) of {total} are held by no rank; every "
            "element of a saved tensor must be in some rank's fragments (a missing partition?)"
        )


@dataclass(frozen=True)
class Stored:
    """A stored piece as the manifest describes it."""

    file: str
    offset: int  # global element offset
    numel: int
    byte_start: int  # absolute position in the file
    sha256: str | None = None


@dataclass(frozen=True)
class Read:
    """Copy `numel` elements from `file` at byte `byte_start` to destination element `dst`."""

    file: str
    byte_start: int
    numel: int
    dst: int
    stored: Stored


class RangeIndex:
    """The stored pieces of one tensor sorted by offset, to find those overlapping a request."""

    def __init__(self, name: str, total: int, stored: list[Stored]) -> None:
        self.name = name
        self.pieces = sorted(stored, key=lambda s: s.offset)
        self._starts = [s.offset for s in self.pieces]
        pos = 0
        for s in self.pieces:
            if s.offset != pos:
                kind = "overlap" if s.offset < pos else "gap"
                raise ValueError(
                    f"tensor {name!r}: stored fragments have a {kind} at element "
                    f"{min(pos, s.offset)}; the manifest is corrupt"
                )
            pos += s.numel
        if pos != total:
            raise ValueError(
                f"tensor {name!r}: stored fragments cover {pos} of {total} elements; the "
                "manifest is corrupt"
            )

    def reads(self, offset: int, numel: int, itemsize: int) -> list[Read]:
        """The byte ranges holding elements [offset, offset+numel), in destination order."""
        out: list[Read] = []
        end = offset + numel
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self.pieces) and self.pieces[i].offset < end:
            s = self.pieces[i]
            a, b = max(offset, s.offset), min(end, s.offset + s.numel)
            if a < b:
                out.append(
                    Read(s.file, s.byte_start + (a - s.offset) * itemsize, b - a, a - offset, s)
                )
            i += 1
        return out
