"""``deepspeed.ops.sparse_attention.sparse_attention_utils`` (ds-data's: the padding helpers)."""

from ds_data.sparse_attention import SparseAttentionUtils

__all__ = ["SparseAttentionUtils"]
