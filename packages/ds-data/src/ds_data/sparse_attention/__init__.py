"""Block-sparse attention with DeepSpeed's API: sparsity layouts and ``SparseSelfAttention``."""

from ._attention import SparseSelfAttention, dense_masked_attention
from ._bert import BertSparseSelfAttention, SparseAttentionUtils
from ._block_mask import TILE, layout_block_mask
from ._sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
)

__all__ = [
    "TILE",
    "BertSparseSelfAttention",
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "SparseAttentionUtils",
    "SparseSelfAttention",
    "SparsityConfig",
    "VariableSparsityConfig",
    "dense_masked_attention",
    "layout_block_mask",
]
