"""``deepspeed.runtime.data_pipeline.data_sampling.data_sampler`` (ds-data's)."""

from ds_data import DeepSpeedDataSampler

__all__ = ["DeepSpeedDataSampler"]
