"""``deepspeed.ops.sparse_attention.sparse_self_attention`` (ds-data's)."""

from ds_data.sparse_attention import SparseSelfAttention

__all__ = ["SparseSelfAttention"]
