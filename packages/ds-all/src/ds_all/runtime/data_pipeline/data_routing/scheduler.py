"""``deepspeed.runtime.data_pipeline.data_routing.scheduler`` (ds-data's)."""

from ds_data import RandomLTDScheduler

__all__ = ["RandomLTDScheduler"]
