"""Sequence parallelism (DeepSpeed-Ulysses) and ALST-style tiled compute for long sequences.

>>> attn = ds_seq.DistributedAttention(local_attention, sp_group)   # q, k, v: [b, s/p, h, d]
>>> out = attn(q, k, v, batch_dim_idx=0)                             # [b, s/p, h, d]
"""

from ds_seq._dataloader import UlyssesSPDataLoaderAdapter, shift_labels
from ds_seq._exchange import SeqExchange, exchange, seq_exchange
from ds_seq._groups import SequenceParallelGroups, build_sequence_parallel_groups
from ds_seq._heads import head_splits
from ds_seq._hf import UlyssesSPAttentionHF
from ds_seq._layer import (
    DistributedAttention,
    SeqAllToAll,
    apply_rotary_pos_emb,
    heads_from_sequence,
    register_all_to_all_group,
    sequence_from_heads,
    single_all_to_all,
    total_heads,
    uneven_heads_all2all,
)
from ds_seq._loss import (
    loss_sum_and_count,
    sequence_parallel_causal_lm_loss,
    sequence_parallel_loss,
)
from ds_seq._offload import HiddenStatesOffload, checkpoint_offload, enable_checkpoint_offload
from ds_seq._tiled import (
    SequenceTiledCompute,
    TiledFusedLogitsLoss,
    TiledMLP,
    enable_tiled_mlp,
    sequence_tiled_compute,
    tiled_causal_lm_loss_sum,
    tiled_mlp_forward,
)
from ds_seq._version import __version__

__all__ = [
    "DistributedAttention",
    "HiddenStatesOffload",
    "SeqAllToAll",
    "SeqExchange",
    "SequenceParallelGroups",
    "SequenceTiledCompute",
    "TiledFusedLogitsLoss",
    "TiledMLP",
    "UlyssesSPAttentionHF",
    "UlyssesSPDataLoaderAdapter",
    "__version__",
    "apply_rotary_pos_emb",
    "build_sequence_parallel_groups",
    "checkpoint_offload",
    "enable_checkpoint_offload",
    "enable_tiled_mlp",
    "exchange",
    "head_splits",
    "heads_from_sequence",
    "loss_sum_and_count",
    "register_all_to_all_group",
    "seq_exchange",
    "sequence_from_heads",
    "sequence_parallel_causal_lm_loss",
    "sequence_parallel_loss",
    "sequence_tiled_compute",
    "shift_labels",
    "single_all_to_all",
    "tiled_causal_lm_loss_sum",
    "tiled_mlp_forward",
    "total_heads",
    "uneven_heads_all2all",
]
