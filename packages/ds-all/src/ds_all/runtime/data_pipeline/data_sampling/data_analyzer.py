"""``deepspeed.runtime.data_pipeline.data_sampling.data_analyzer`` (ds-data's)."""

from ds_data import DataAnalyzer

__all__ = ["DataAnalyzer"]
