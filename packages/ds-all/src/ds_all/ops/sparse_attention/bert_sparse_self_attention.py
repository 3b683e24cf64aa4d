"""``deepspeed.ops.sparse_attention.bert_sparse_self_attention`` (ds-data's)."""

from ds_data.sparse_attention import BertSparseSelfAttention

__all__ = ["BertSparseSelfAttention"]
