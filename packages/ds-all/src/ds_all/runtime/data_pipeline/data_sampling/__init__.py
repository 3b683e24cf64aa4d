"""``deepspeed.runtime.data_pipeline.data_sampling``: DataAnalyzer and the curriculum sampler
(ds-data's)."""

from ds_all.runtime.data_pipeline.data_sampling import data_analyzer, data_sampler, indexed_dataset

__all__ = ["data_analyzer", "data_sampler", "indexed_dataset"]
