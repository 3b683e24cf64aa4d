"""``deepspeed.sequence.layer``: ``DistributedAttention`` (ds-seq's)."""

from ds_seq import DistributedAttention

__all__ = ["DistributedAttention"]
