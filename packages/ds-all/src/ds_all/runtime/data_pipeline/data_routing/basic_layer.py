"""``deepspeed.runtime.data_pipeline.data_routing.basic_layer`` (ds-data's)."""

from ds_data import RandomLayerTokenDrop

__all__ = ["RandomLayerTokenDrop"]
