"""ds-data: DeepSpeed's data-efficiency features (curriculum learning, data analyzer and
curriculum sampler, random-LTD, progressive layer drop) and block-sparse attention
(``ds_data.sparse_attention``)."""

from ._curriculum import SCHEDULE_TYPES, CurriculumScheduler
from ._errors import DataConfigError
from ._ltd_schedule import RandomLTDScheduler
from ._pld import ProgressiveLayerDrop
from ._version import __version__

__all__ = [
    "SCHEDULE_TYPES",
    "CurriculumScheduler",
    "DataConfigError",
    "ProgressiveLayerDrop",
    "RandomLTDScheduler",
    "__version__",
]
