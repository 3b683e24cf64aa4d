"""``deepspeed.runtime.data_pipeline.data_routing``: random-LTD (ds-data's)."""

from ds_all.runtime.data_pipeline.data_routing import basic_layer, helper, scheduler

__all__ = ["basic_layer", "helper", "scheduler"]
