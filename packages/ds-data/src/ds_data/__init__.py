"""ds-data: DeepSpeed's data-efficiency features (curriculum learning, data analyzer and
curriculum sampler, random-LTD, progressive layer drop) and block-sparse attention
(``ds_data.sparse_attention``)."""

from ._analyzer import DataAnalyzer
from ._config import (
    data_efficiency_config,
    legacy_curriculum_config,
    progressive_layer_drop_config,
    sparse_attention_config,
    sparsity_config_from_dict,
)
from ._curriculum import SCHEDULE_TYPES, CurriculumScheduler
from ._errors import DataConfigError
from ._index_file import IndexedRows, find_fit_int_dtype, write_rows
from ._ltd_schedule import RandomLTDScheduler
from ._pld import ProgressiveLayerDrop
from ._random_ltd import (
    RandomLayerTokenDrop,
    bert_sample_tokens,
    convert_to_random_ltd,
    gather_tokens,
    gpt_sample_tokens,
    random_ltd_initialize,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
    scatter_tokens,
)
from ._sampler import DeepSpeedDataSampler
from ._version import __version__

__all__ = [
    "SCHEDULE_TYPES",
    "CurriculumScheduler",
    "DataAnalyzer",
    "DataConfigError",
    "DeepSpeedDataSampler",
    "IndexedRows",
    "ProgressiveLayerDrop",
    "RandomLTDScheduler",
    "RandomLayerTokenDrop",
    "bert_sample_tokens",
    "convert_to_random_ltd",
    "data_efficiency_config",
    "find_fit_int_dtype",
    "gather_tokens",
    "gpt_sample_tokens",
    "legacy_curriculum_config",
    "progressive_layer_drop_config",
    "random_ltd_initialize",
    "remove_random_ltd_state_dict",
    "save_without_random_ltd",
    "scatter_tokens",
    "sparse_attention_config",
    "sparsity_config_from_dict",
    "write_rows",
    "__version__",
]
