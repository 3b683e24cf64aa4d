"""Block layouts of DeepSpeed's sparse-attention patterns.

Each config's ``make_layout(seq_len)`` returns an int64 tensor ``(num_heads, nb, nb)`` with
``nb = seq_len // block``; ``layout[h, i, j] == 1`` means query block ``i`` of head ``h`` attends
to key block ``j``. The algorithms are DeepSpeed's published ones (the layouts are equal, random
blocks included: those are drawn with Python's ``random.sample`` in DeepSpeed's order, so after
``random.seed(s)`` both give the same layout). Pass ``rng=random.Random(s)`` for a private
generator instead of the process-wide one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

__all__ = [
    "SparsityConfig",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "VariableSparsityConfig",
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
]

_DIRECTIONS = ("unidirectional", "bidirectional")


def _check_attention(attention: str) -> None:
    if attention not in _DIRECTIONS:
        raise NotImplementedError(
            f"attention {attention!r} is not supported: use 'unidirectional' (causal) or "
            f"'bidirectional'"
        )


def _check_global_ranges(starts: Sequence[int], ends: Sequence[int] | None) -> None:
    if ends is None:
        return
    if len(starts) != len(ends):
        raise ValueError(
            f"global_block_indices ({len(starts)}) and global_block_end_indices ({len(ends)}) "
            f"need the same length: each pair is one [start, end) range of global blocks"
        )
    for start, end in zip(starts, ends):
        if start >= end:
            raise ValueError(f"global block start index {start} must be below its end index {end}")


class SparsityConfig:
    """Shared part of every pattern: heads, block size, one layout or one per head."""

    num_heads: int
    block: int
    different_layout_per_head: bool
    num_layout_heads: int
    rng: random.Random | None

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 *, rng: random.Random | None = None) -> None:  # fmt: skip
        if num_heads <= 0 or block <= 0:
            raise ValueError(f"num_heads ({num_heads}) and block ({block}) must be positive")
        self.num_heads = num_heads
        self.block = block
        self.different_layout_per_head = different_layout_per_head
        self.num_layout_heads = num_heads if different_layout_per_head else 1
        self.rng = rng

    def setup_layout(self, seq_len: int) -> torch.Tensor:
        """An all-zero layout for ``seq_len`` tokens (which must be a multiple of ``block``)."""
        if seq_len % self.block != 0:
            raise ValueError(
                f"sequence length {seq_len} must be a multiple of the block size {self.block}: "
                f"pad the sequence"
            )
        nb = seq_len // self.block
        return torch.zeros((self.num_heads, nb, nb), dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout: torch.Tensor) -> torch.Tensor:
        """Copies head 0's layout to every head unless each head has its own."""
        if not self.different_layout_per_head:
            layout[1 : self.num_heads] = layout[0]
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define a layout")

    def _sample(self, population: range, k: int) -> list[int]:
        # DeepSpeed draws from the process-wide generator; the same call order keeps layouts equal.
        source = self.rng if self.rng is not None else random
        return source.sample(population, k)

    def _sliding_window(self, h: int, layout: torch.Tensor, window: int, causal: bool) -> None:
        nb = layout.shape[1]
        if nb < window:
            raise ValueError(
                f"num_sliding_window_blocks {window} is more than the {nb} blocks of a row: "
                f"use a longer sequence or a smaller window"
            )
        w = window // 2
        for row in range(nb):
            end = row + 1 if causal else min(row + w + 1, nb)
            layout[h, row, max(0, row - w) : end] = 1


class DenseSparsityConfig(SparsityConfig):
    """Every block attends to every block (a reference pattern)."""

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        layout[:] = 1
        return layout


class FixedSparsityConfig(SparsityConfig):
    """Sparse Transformer's "fixed" pattern (Child et al., 2019) as DeepSpeed customised it.

    Local windows of ``num_local_blocks`` blocks attend within themselves; the last
    ``num_global_blocks`` blocks of each window (an earlier slice for other heads when
    ``num_different_global_patterns > 1``) are attended to by every row (by later rows only when
    unidirectional), and with ``horizontal_global_attention`` also attend to every block.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_local_blocks: int = 4, num_global_blocks: int = 1,
                 attention: str = "bidirectional", horizontal_global_attention: bool = False,
                 num_different_global_patterns: int = 1, *,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        super().__init__(num_heads, block, different_layout_per_head, rng=rng)
        if num_local_blocks % num_global_blocks != 0:
            raise ValueError(
                f"num_local_blocks {num_local_blocks} must be a multiple of num_global_blocks "
                f"{num_global_blocks}"
            )
        _check_attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError("horizontal_global_attention needs attention='bidirectional'")
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError(
                "num_different_global_patterns > 1 needs different_layout_per_head=True (one "
                "layout cannot hold several global patterns)"
            )
        if num_different_global_patterns > num_local_blocks // num_global_blocks:
            raise ValueError(
                f"num_different_global_patterns {num_different_global_patterns} cannot exceed "
                f"num_local_blocks / num_global_blocks = {num_local_blocks // num_global_blocks}"
            )
        self.num_local_blocks = num_local_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self.num_different_global_patterns = num_different_global_patterns

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        causal = self.attention == "unidirectional"
        for start in range(0, nb, self.num_local_blocks):
            end = min(start + self.num_local_blocks, nb)
            for row in range(start, end):
                layout[h, row, start : (row + 1 if causal else end)] = 1
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        g = self.num_global_blocks
        first = self.num_local_blocks - (1 + h % self.num_different_global_patterns) * g
        bidirectional = self.attention == "bidirectional"
        # Every complete local window gets its global slice...
        end = nb - (nb % self.num_local_blocks)
        for col in range(first, end, self.num_local_blocks):
            layout[h, 0 if bidirectional else col :, col : col + g] = 1
            if self.horizontal_global_attention:
                layout[h, col : col + g, :] = 1
        # ...and a short last window gets one too, pulled back inside the sequence.
        if end < nb:
            start = min(end + first, nb - g)
            layout[h, 0 if bidirectional else start :, start : start + g] = 1
            if self.horizontal_global_attention:
                layout[h, start : start + g, :] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class VariableSparsityConfig(SparsityConfig):
    """Fixed's generalisation: random blocks, a list of local window sizes, chosen global blocks.

    ``local_window_blocks`` gives the sizes of the first windows; the last size repeats to the
    end. ``global_block_indices`` (with optional exclusive ``global_block_end_indices``) are the
    global blocks, attended to by every row (vertically) and, with
    ``horizontal_global_attention``, attending to every block.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_random_blocks: int = 0, local_window_blocks: Sequence[int] = (4,),
                 global_block_indices: Sequence[int] = (0,),
                 global_block_end_indices: Sequence[int] | None = None,
                 attention: str = "bidirectional", horizontal_global_attention: bool = False, *,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        super().__init__(num_heads, block, different_layout_per_head, rng=rng)
        _check_global_ranges(global_block_indices, global_block_end_indices)
        _check_attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError("horizontal_global_attention needs attention='bidirectional'")
        if not local_window_blocks or any(w <= 0 for w in local_window_blocks):
            raise ValueError(
                f"local_window_blocks must be positive sizes, got {local_window_blocks}"
            )
        self.num_random_blocks = num_random_blocks
        self.local_window_blocks = list(local_window_blocks)
        self.global_block_indices = list(global_block_indices)
        self.global_block_end_indices = (
            None if global_block_end_indices is None else list(global_block_end_indices)
        )
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention

    def set_random_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if nb < self.num_random_blocks:
            raise ValueError(
                f"num_random_blocks {self.num_random_blocks} is more than the {nb} blocks of a row"
            )
        for row in range(nb):
            # DeepSpeed samples over the whole row here even when unidirectional.
            layout[h, row, self._sample(range(nb), self.num_random_blocks)] = 1
        return layout

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        causal = self.attention == "unidirectional"

        def window(start: int, end: int) -> None:
            for row in range(start, end):
                layout[h, row, start : (row + 1 if causal else end)] = 1

        start = 0
        for size in self.local_window_blocks:
            window(start, min(start + size, nb))
            start += size
        size = self.local_window_blocks[-1]
        for begin in range(start, nb, size):
            window(begin, min(begin + size, nb))
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        bidirectional = self.attention == "bidirectional"
        if self.global_block_end_indices is None:
            ranges = [(i, i + 1) for i in self.global_block_indices]
        else:
            ranges = list(zip(self.global_block_indices, self.global_block_end_indices))
        for start, end in ranges:
            if start >= nb:
                continue
            end = min(end, nb)
            if self.horizontal_global_attention:
                layout[h, start:end, :] = 1
            layout[h, 0 if bidirectional else start :, start:end] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout)
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class BigBirdSparsityConfig(SparsityConfig):
    """BigBird (Zaheer et al., 2020) in blocks: random, sliding window and global (ITC) blocks."""

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_random_blocks: int = 1, num_sliding_window_blocks: int = 3,
                 num_global_blocks: int = 1, attention: str = "bidirectional", *,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        super().__init__(num_heads, block, different_layout_per_head, rng=rng)
        _check_attention(attention)
        self.num_random_blocks = num_random_blocks
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention

    def set_random_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if nb < self.num_random_blocks:
            raise ValueError(
                f"num_random_blocks {self.num_random_blocks} is more than the {nb} blocks of a row"
            )
        causal = self.attention == "unidirectional"
        for row in range(nb):
            candidates = range(row + 1) if causal else range(nb)
            # DeepSpeed's random.sample raises on the first causal rows when they have fewer
            # blocks than num_random_blocks; those rows take every block they can see instead.
            k = min(self.num_random_blocks, len(candidates))
            layout[h, row, self._sample(candidates, k)] = 1
        return layout

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        self._sliding_window(h, layout, self.num_sliding_window_blocks, causal=False)
        return layout

    def set_global_layout_itc(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if nb < self.num_global_blocks:
            raise ValueError(
                f"num_global_blocks {self.num_global_blocks} is more than the {nb} blocks of a row"
            )
        layout[h, : self.num_global_blocks, :] = 1
        layout[h, :, : self.num_global_blocks] = 1
        if self.attention == "unidirectional":
            # As DeepSpeed: the causal cut is applied to every head's layout at this point.
            layout = torch.tril(layout)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout)
            self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout_itc(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class BSLongformerSparsityConfig(SparsityConfig):
    """Block-sparse Longformer (Beltagy et al., 2020): sliding window plus global blocks."""

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_sliding_window_blocks: int = 3, global_block_indices: Sequence[int] = (0,),
                 global_block_end_indices: Sequence[int] | None = None,
                 attention: str = "bidirectional", *,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        super().__init__(num_heads, block, different_layout_per_head, rng=rng)
        _check_global_ranges(global_block_indices, global_block_end_indices)
        _check_attention(attention)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = list(global_block_indices)
        self.global_block_end_indices = (
            None if global_block_end_indices is None else list(global_block_end_indices)
        )
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        self._sliding_window(h, layout, self.num_sliding_window_blocks, causal=False)
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.global_block_end_indices is None:
            ranges = [(i, i + 1) for i in self.global_block_indices]
        else:
            ranges = list(zip(self.global_block_indices, self.global_block_end_indices))
        for start, end in ranges:
            if start < nb:
                layout[h, start : min(end, nb), :] = 1
                layout[h, :, start : min(end, nb)] = 1
        if self.attention == "unidirectional":
            layout = torch.tril(layout)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """Purely local attention: each block sees ``num_sliding_window_blocks // 2`` blocks back
    (and forward when bidirectional)."""

    def __init__(self, num_heads: int, block: int = 16, num_sliding_window_blocks: int = 3,
                 attention: str = "unidirectional", *,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        super().__init__(num_heads, block, rng=rng)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        causal = self.attention != "bidirectional"
        self._sliding_window(h, layout, self.num_sliding_window_blocks, causal=causal)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)
