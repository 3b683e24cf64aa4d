"""``deepspeed.sequence.layer``: Ulysses attention and its all-to-all exchange (ds-seq's)."""

from ds_seq import (
    DistributedAttention,
    SeqAllToAll,
    apply_rotary_pos_emb,
    register_all_to_all_group,
    single_all_to_all,
    uneven_heads_all2all,
)

#: DeepSpeed's name for the differentiable exchange (code imports it by this name)
_SeqAllToAll = SeqAllToAll

__all__ = [
    "DistributedAttention",
    "_SeqAllToAll",
    "apply_rotary_pos_emb",
    "register_all_to_all_group",
    "single_all_to_all",
    "uneven_heads_all2all",
]
