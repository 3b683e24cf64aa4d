"""``deepspeed.runtime.data_pipeline``: curriculum learning, data sampling and data routing
(random-LTD), implemented by ds-data."""

from ds_all.runtime.data_pipeline import curriculum_scheduler, data_routing, data_sampling

__all__ = ["curriculum_scheduler", "data_routing", "data_sampling"]
