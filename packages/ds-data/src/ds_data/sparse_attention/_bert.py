"""DeepSpeed's BERT helpers for sparse attention: a BERT self-attention layer on
``SparseSelfAttention`` and the padding of inputs to a multiple of the block size."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import SparseSelfAttention
from ._sparsity_config import FixedSparsityConfig, SparsityConfig

__all__ = ["BertSparseSelfAttention", "SparseAttentionUtils"]


class BertSparseSelfAttention(nn.Module):
    """BERT's self-attention (query/key/value projections, heads) with block-sparse attention.

    ``config`` has ``hidden_size`` and ``num_attention_heads`` (a Hugging Face ``BertConfig``);
    ``forward(hidden_states, attention_mask)`` takes BERT's additive key mask (``(batch, 1, 1,
    L)`` or ``(batch, L)``) and returns the context ``(batch, L, hidden)``; ``L`` must be a
    multiple of the block size (see ``SparseAttentionUtils.pad_to_block_size``).
    """

    def __init__(self, config: Any, sparsity_config: SparsityConfig | None = None) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}"
            )
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.sparse_self_attention = SparseSelfAttention(
            sparsity_config or FixedSparsityConfig(num_heads=config.num_attention_heads)
        )

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size)
        return x.permute(0, 2, 1, 3)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        context = self.sparse_self_attention(q, k, v, key_padding_mask=attention_mask)
        context = context.permute(0, 2, 1, 3).contiguous()
        return context.view(*context.shape[:-2], self.all_head_size)


class SparseAttentionUtils:
    """DeepSpeed's padding helpers (its Hugging Face model surgery helpers are not provided)."""

    @staticmethod
    def pad_to_block_size(block_size: int, input_ids, attention_mask, token_type_ids, position_ids,
                          inputs_embeds, pad_token_id: int, model_embeddings=None):  # fmt: skip
        """Pads the sequence dimension of the inputs to a multiple of ``block_size``.

        Returns ``(pad_len, input_ids, attention_mask, token_type_ids, position_ids,
        inputs_embeds)``: ids and positions padded with ``pad_token_id``, the attention mask with
        0 (the padding is not attended), token types with 0, embeddings with the embedding of
        ``pad_token_id`` (``model_embeddings`` computes it). ``unpad_sequence_output`` undoes it.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = ref.shape[0], ref.shape[1]
        pad_len = (block_size - seq_len % block_size) % block_size
        if pad_len == 0:
            return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
        if inputs_embeds is not None:
            if model_embeddings is None:
                raise ValueError("pad_to_block_size: inputs_embeds need model_embeddings to embed "
                                 "the padding tokens")  # fmt: skip
            pad_ids = inputs_embeds.new_full((batch_size, pad_len), pad_token_id, dtype=torch.long)
            inputs_embeds = torch.cat([inputs_embeds, model_embeddings(pad_ids)], dim=-2)
        if input_ids is not None:
            input_ids = F.pad(input_ids, (0, pad_len), value=pad_token_id)
        if position_ids is not None:
            position_ids = F.pad(position_ids, (0, pad_len), value=pad_token_id)
        if attention_mask is not None:
            attention_mask = F.pad(attention_mask, (0, pad_len), value=0)
        if token_type_ids is not None:
            token_type_ids = F.pad(token_type_ids, (0, pad_len), value=0)
        return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

    @staticmethod
    def unpad_sequence_output(pad_len: int, sequence_output: torch.Tensor) -> torch.Tensor:
        """The encoder output without the ``pad_len`` positions ``pad_to_block_size`` added."""
        return sequence_output[:, :-pad_len] if pad_len > 0 else sequence_output
