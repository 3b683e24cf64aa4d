"""ds-data: DeepSpeed's data-efficiency features (curriculum learning, data analyzer and
curriculum sampler, random-LTD, progressive layer drop) and block-sparse attention
(``ds_data.sparse_attention``)."""

from ._curriculum import SCHEDULE_TYPES, CurriculumScheduler
from ._errors import DataConfigError
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
from ._version import __version__

__all__ = [
    "SCHEDULE_TYPES",
    "CurriculumScheduler",
    "DataConfigError",
    "ProgressiveLayerDrop",
    "RandomLTDScheduler",
    "RandomLayerTokenDrop",
    "bert_sample_tokens",
    "convert_to_random_ltd",
    "gather_tokens",
    "gpt_sample_tokens",
    "random_ltd_initialize",
    "remove_random_ltd_state_dict",
    "save_without_random_ltd",
    "scatter_tokens",
    "__version__",
]
