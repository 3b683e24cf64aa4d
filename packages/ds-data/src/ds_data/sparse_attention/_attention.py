"""``SparseSelfAttention``: DeepSpeed's module, on FlexAttention (CUDA) or a masked dense path."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from ._block_mask import layout_block_mask
from ._sparsity_config import FixedSparsityConfig, SparsityConfig

__all__ = ["SparseSelfAttention", "dense_masked_attention"]

_MASK_MODES = ("add", "mul")


@functools.cache
def _compiled_flex():
    # Compiled once per process: FlexAttention's eager path materialises the full score matrix.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _additive(mask: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """DeepSpeed's mask modes: 'add' adds the values, 'mul' turns zeros into -inf."""
    if mode == "mul":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(
            mask == 0, torch.tensor(float("-inf"), dtype=dtype, device=mask.device), zero
        )
    return mask.to(dtype)


def dense_masked_attention(query, key, value, token_mask, scale, rpe=None, key_padding_mask=None,
                           attn_mask=None, key_padding_mask_mode="add", attn_mask_mode="mul"):  # fmt: skip
    """Softmax attention over the whole score matrix with the layout's token mask.

    ``token_mask``: bool, broadcastable to ``(batch, heads, L, L)``. The reference every path
    is checked against, and the CPU path.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if rpe is not None:
        scores = scores + rpe
    if key_padding_mask is not None:
        kpm = _additive(key_padding_mask, key_padding_mask_mode, scores.dtype)
        scores = scores + kpm.reshape(kpm.shape[0], 1, 1, -1)
    if attn_mask is not None:
        scores = scores + _additive(attn_mask, attn_mask_mode, scores.dtype)
    scores = scores.masked_fill(~token_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


class SparseSelfAttention(nn.Module):
    """Block-sparse self-attention with DeepSpeed's signature.

    Args:
        sparsity_config: the pattern (a ``SparsityConfig`` subclass instance); DeepSpeed's
            default ``SparsityConfig(num_heads=4)`` has no layout, so the default here is
            ``FixedSparsityConfig(num_heads=4)`` (the config section's default mode).
        key_padding_mask_mode, attn_mask_mode: ``'add'`` adds the mask to the scores,
            ``'mul'`` masks out the positions where it is 0.
        max_seq_length: the layout is built once for this length (a buffer, so it is saved with
            the model); shorter multiples of the block use its top-left corner.

    ``forward(query, key, value, rpe=None, key_padding_mask=None, attn_mask=None)`` takes
    ``(batch, heads, L, head_dim)`` tensors (a key given as ``(batch, heads, head_dim, L)`` is
    transposed back, as DeepSpeed does), ``key_padding_mask`` ``(batch, L)``, ``attn_mask``
    ``(L, L)``, ``rpe`` broadcastable to the scores. Any floating dtype (DeepSpeed's Triton
    kernels took fp16 only). On CUDA it runs FlexAttention with a block mask built from the
    layout (compiled, cached per length); on CPU the masked dense reference.
    """

    master_layout: torch.Tensor

    def __init__(self, sparsity_config: SparsityConfig | None = None,
                 key_padding_mask_mode: str = "add", attn_mask_mode: str = "mul",
                 max_seq_length: int = 2048) -> None:  # fmt: skip
        super().__init__()
        for name, mode in (("key_padding_mask_mode", key_padding_mask_mode),
                           ("attn_mask_mode", attn_mask_mode)):  # fmt: skip
            if mode not in _MASK_MODES:
                raise ValueError(f"{name} must be 'add' or 'mul', got {mode!r}")
        self.sparsity_config = sparsity_config or FixedSparsityConfig(num_heads=4)
        self.key_padding_mask_mode = key_padding_mask_mode
        self.attn_mask_mode = attn_mask_mode
        self.register_buffer("master_layout", self.sparsity_config.make_layout(max_seq_length))
        self._need_layout_synchronization = True
        self._block_masks: dict[tuple[int, str], object] = {}

    def get_layout(self, L: int) -> torch.Tensor:
        """The ``(heads, L / block, L / block)`` layout for length ``L``."""
        if self._need_layout_synchronization and dist.is_available() and dist.is_initialized():
            # Random blocks differ between ranks unless seeded alike: rank 0's layout wins, as
            # in DeepSpeed, so every data-parallel replica computes the same function.
            dist.broadcast(self.master_layout, src=0)
            self._need_layout_synchronization = False
        block = self.sparsity_config.block
        if L % block != 0:
            raise ValueError(f"sequence length {L} must be a multiple of the block size {block}")
        nb = L // block
        if nb > self.master_layout.shape[-1]:
            raise ValueError(
                f"sequence length {L} is longer than max_seq_length "
                f"{self.master_layout.shape[-1] * block}: build the module with a larger "
                f"max_seq_length"
            )
        return self.master_layout[..., :nb, :nb]

    def _shared_layout(self, L: int) -> torch.Tensor:
        layout = self.get_layout(L)
        if not self.sparsity_config.different_layout_per_head or bool((layout == layout[:1]).all()):
            return layout[:1]
        return layout

    def token_mask(self, L: int) -> torch.Tensor:
        """The layout expanded to tokens: ``(heads or 1, L, L)`` bool."""
        block = self.sparsity_config.block
        layout = self._shared_layout(L) != 0
        return layout.repeat_interleave(block, 1).repeat_interleave(block, 2)

    def block_mask(self, L: int, device) -> object:
        key = (L, str(device))
        if key not in self._block_masks:
            layout = self._shared_layout(L)
            self._block_masks[key] = layout_block_mask(
                layout, self.sparsity_config.block, L, device
            )
        return self._block_masks[key]

    def forward(self, query, key, value, rpe=None, key_padding_mask=None, attn_mask=None):
        bsz, num_heads, tgt_len, head_dim = query.shape
        if key.shape[-1] == tgt_len and key.shape[-2] != tgt_len:
            key = key.transpose(-1, -2)
        if query.shape != key.shape or key.shape != value.shape:
            raise NotImplementedError(
                f"only self-attention is supported: query {tuple(query.shape)}, key "
                f"{tuple(key.shape)} and value {tuple(value.shape)} must have the same shape"
            )
        if num_heads != self.sparsity_config.num_heads:
            raise ValueError(
                f"the input has {num_heads} heads, the sparsity config {self.sparsity_config.num_heads}"
            )
        scale = float(head_dim) ** -0.5
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.reshape(bsz, tgt_len)
        if attn_mask is not None:
            attn_mask = attn_mask.reshape(tgt_len, tgt_len)
        if query.is_cuda:
            return self._flex(query, key, value, scale, rpe, key_padding_mask, attn_mask)
        mask = self.token_mask(tgt_len).to(query.device)
        return dense_masked_attention(query, key, value, mask, scale, rpe, key_padding_mask,
                                      attn_mask, self.key_padding_mask_mode,
                                      self.attn_mask_mode)  # fmt: skip

    def _flex(self, query, key, value, scale, rpe, key_padding_mask, attn_mask):
        block_mask = self.block_mask(query.shape[-2], query.device)
        score_mod = None
        if rpe is not None or key_padding_mask is not None or attn_mask is not None:
            score_mod = self._score_mod(query, rpe, key_padding_mask, attn_mask)
        return _compiled_flex()(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                scale=scale)  # fmt: skip

    def _score_mod(self, query, rpe, key_padding_mask, attn_mask):
        shape = (query.shape[0], query.shape[1], query.shape[2], query.shape[2])
        rpe_full = None if rpe is None else rpe.expand(shape)
        kpm = None
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, self.key_padding_mask_mode, torch.float32)
        am = None if attn_mask is None else _additive(attn_mask, self.attn_mask_mode, torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            if rpe_full is not None:
                score = score + rpe_full[b, h, q_idx, kv_idx]
            if kpm is not None:
                score = score + kpm[b, kv_idx]
            if am is not None:
                score = score + am[q_idx, kv_idx]
            return score

        return score_mod
