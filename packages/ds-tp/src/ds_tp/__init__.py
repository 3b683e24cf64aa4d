"""ds-tp: tensor parallelism for training.

>>> import ds_tp
>>> groups = ds_tp.build_tensor_parallel_groups(2)           # tp x dp = world, an mpu
>>> up = ds_tp.ColumnParallelLinear(1024, 4096, group=groups.tp_group)
>>> down = ds_tp.RowParallelLinear(4096, 1024, group=groups.tp_group, input_is_parallel=True)
>>> ds_tp.autotp(model, groups.tp_group, preset_model="llama")  # shard an existing model
"""

from ds_tp._autotp import autotp, gather_full_state_dict
from ds_tp._autotp_config import (
    PRESETS,
    AutoTPConfig,
    PartitionType,
    TPLayerSpec,
    merge_autotp_configs,
    preset_config,
    resolve_partition_config,
)
from ds_tp._checkpoint import partitioned_checkpoint
from ds_tp._cross_entropy import vocab_parallel_cross_entropy
from ds_tp._deepspeed_layers import LinearAllreduce, LinearLayer
from ds_tp._embedding import VocabParallelEmbedding
from ds_tp._fragments import ShardFragment, full_tensor_fragments, shard_layouts
from ds_tp._groups import TensorParallelGroups, build_tensor_parallel_groups
from ds_tp._layers import ColumnParallelLinear, RowParallelLinear, mark_tp_param
from ds_tp._mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
)
from ds_tp._sequence import sequence_parallel_grad_hooks
from ds_tp._shard import TPShard
from ds_tp._version import __version__

__all__ = [
    "PRESETS",
    "AutoTPConfig",
    "PartitionType",
    "TPLayerSpec",
    "autotp",
    "gather_full_state_dict",
    "merge_autotp_configs",
    "partitioned_checkpoint",
    "preset_config",
    "resolve_partition_config",
    "ColumnParallelLinear",
    "LinearAllreduce",
    "LinearLayer",
    "RowParallelLinear",
    "ShardFragment",
    "TPShard",
    "TensorParallelGroups",
    "VocabParallelEmbedding",
    "__version__",
    "build_tensor_parallel_groups",
    "copy_to_tp_region",
    "full_tensor_fragments",
    "gather_from_sequence_region",
    "gather_from_tp_region",
    "mark_tp_param",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_region",
    "scatter_to_sequence_region",
    "scatter_to_tp_region",
    "sequence_parallel_grad_hooks",
    "shard_layouts",
    "vocab_parallel_cross_entropy",
]
