"""Range arithmetic: who writes which elements on save, and which bytes a reader needs on load.

Pure functions over integers, so the resharding math is tested without files or processes.
"""

from __future__ import annotations

import bisect
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


def plan_writes(
    held: list[HeldRange], itemsizes: dict[str, int] | None = None
) -> dict[int, list[Piece]]:
    """Assign every element of every tensor to exactly one of the ranks holding it.

    Replicated copies (ZeRO stage 0/1 weights on every rank) are thereby written once, so the
    checkpoint holds one model whatever the replication. A range held by several ranks goes to
    the one with the fewest bytes assigned so far (ties: lowest rank), so replicated weights are
    spread over the ranks' writers instead of all landing on rank 0. The result is a pure
    function of `held`, identical on every rank. Raises when ranks disagree on a tensor's
    shape/dtype or when some elements are held by nobody, since such a checkpoint could not be
    loaded back in full.
    """
    by_name: dict[str, list[HeldRange]] = defaultdict(list)
    for h in held:
        by_name[h.name].append(h)
    out: dict[int, list[Piece]] = defaultdict(list)
    load: dict[int, int] = defaultdict(int)
    # Ranges with one holder first: they fix each rank's base load before balancing the rest.
    segments: list[tuple[str, int, int, list[HeldRange]]] = []
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
        nonempty = [h for h in ranges if h.numel > 0]
        _check_covered(name, total, nonempty)
        segments += _segments(name, nonempty)
    isz = itemsizes or {}
    for name, a, b, holders in segments:
        if len({h.rank for h in holders}) == 1:
            load[holders[0].rank] += (b - a) * isz.get(name, 1)
    for name, a, b, holders in segments:
        if len({h.rank for h in holders}) == 1:
            owner = holders[0]
        else:
            owner = min(holders, key=lambda h: (load[h.rank], h.rank, h.index))
            load[owner.rank] += (b - a) * isz.get(name, 1)
        pieces = out[owner.rank]
        last = pieces[-1] if pieces else None
        if (
            last
            and last.name == name
            and last.index == owner.index
            and last.offset + last.numel == a
        ):
            pieces[-1] = Piece(owner.rank, owner.index, name, last.offset, last.numel + b - a)
        else:
            pieces.append(Piece(owner.rank, owner.index, name, a, b - a))
    return dict(out)


def _segments(name: str, ranges: list[HeldRange]) -> list[tuple[str, int, int, list[HeldRange]]]:
    """Split a tensor at every range boundary; each elementary segment with its holders, the
    lowest index first per rank (a rank holding a range twice writes it from one copy)."""
    points = sorted({h.offset for h in ranges} | {h.offset + h.numel for h in ranges})
    starts = sorted(ranges, key=lambda h: h.offset)
    active: list[HeldRange] = []
    out = []
    j = 0
    for a, b in zip(points, points[1:]):  # a sweep: active = ranges covering [a, b)
        while j < len(starts) and starts[j].offset <= a:
            active.append(starts[j])
            j += 1
        active = [h for h in active if h.offset + h.numel > a]
        holders: dict[int, HeldRange] = {}
        for h in active:
            if h.rank not in holders or h.index < holders[h.rank].index:
                holders[h.rank] = h
        if holders:
            out.append((name, a, b, sorted(holders.values(), key=lambda h: h.rank)))
    return out


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
    chunk_hashes: str | None = None  # chunk digests (see _checksum); None: version 1


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
