"""``deepspeed.ops.sparse_attention``: block-sparse attention (ds-data's: FlexAttention block
masks on CUDA, a masked dense path on CPU)."""

from ds_all.ops.sparse_attention import sparse_self_attention, sparsity_config
from ds_data.sparse_attention import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparseSelfAttention,
    SparsityConfig,
    VariableSparsityConfig,
)

__all__ = [
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "SparseSelfAttention",
    "SparsityConfig",
    "VariableSparsityConfig",
    "sparse_self_attention",
    "sparsity_config",
]
