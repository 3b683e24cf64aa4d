"""A block layout as a FlexAttention ``BlockMask``: exact at any block size.

FlexAttention schedules work in tiles of ``TILE`` x ``TILE`` tokens: a tile whose layout blocks
are all on is "full" (no per-element mask), one with some on is "partial" (the element mask
``mask_mod`` decides), one with none is skipped. The layout maps onto tiles directly when the
block size divides the tile or is a multiple of it; any other block size goes through
``create_block_mask``, which evaluates the element mask everywhere once.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

__all__ = ["TILE", "layout_block_mask", "layout_mask_mod"]

#: FlexAttention's default tile edge, in tokens.
TILE = 128


def layout_mask_mod(layout: torch.Tensor, block: int):
    """The element mask of a ``(heads or 1, nb, nb)`` layout: token ``q`` sees token ``kv``."""
    on = layout != 0
    shared = on.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        return on[0 if shared else h, q_idx // block, kv_idx // block]

    return mask_mod


def _tiles(layout: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any on, all on) per tile, each ``(heads, n_tiles, n_tiles)`` bool."""
    on = layout != 0
    if block % TILE == 0:
        r = block // TILE
        tiles = on.repeat_interleave(r, 1).repeat_interleave(r, 2)
        return tiles, tiles
    r = TILE // block
    h, nb, _ = on.shape
    grouped = on.view(h, nb // r, r, nb // r, r)
    return grouped.any(dim=(2, 4)), grouped.all(dim=(2, 4))


def _indices(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, column indices with the chosen ones first) per query tile, as FlexAttention
    stores them, with a batch dimension of 1."""
    counts = chosen.sum(-1, dtype=torch.int32)
    order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[None].contiguous(), order.to(torch.int32)[None].contiguous()


def layout_block_mask(layout: torch.Tensor, block: int, seq_len: int, device) -> BlockMask:
    """The ``BlockMask`` of ``layout`` (``(heads or 1, nb, nb)``) for ``seq_len`` tokens."""
    nb = seq_len // block
    layout = layout[:, :nb, :nb].to(device)
    mask_mod = layout_mask_mod(layout, block)
    aligned = seq_len % TILE == 0 and (block % TILE == 0 or TILE % block == 0)
    if not aligned:
        return create_block_mask(mask_mod, None, layout.shape[0], seq_len, seq_len, device=device)
    any_on, all_on = _tiles(layout, block)
    partial = any_on & ~all_on
    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(all_on)
    # mask_mod is still given: FlexAttention applies it to partial tiles (and its eager CPU
    # path applies it everywhere), so the result is exact whichever path runs.
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE,
                                    mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))  # fmt: skip
