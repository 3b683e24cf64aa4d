"""``deepspeed.ops.sparse_attention``: block-sparse attention (ds-data's: FlexAttention block
masks on CUDA, a masked dense path on CPU)."""

from ds_all.ops.sparse_attention import (
    bert_sparse_self_attention,
    sparse_attention_utils,
    sparse_self_attention,
    sparsity_config,
)
from ds_data.sparse_attention import (
    BertSparseSelfAttention,
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparseAttentionUtils,
    SparseSelfAttention,
    SparsityConfig,
    VariableSparsityConfig,
)

__all__ = [
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
    "bert_sparse_self_attention",
    "sparse_attention_utils",
    "sparse_self_attention",
    "sparsity_config",
]
