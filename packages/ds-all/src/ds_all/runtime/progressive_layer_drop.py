"""``deepspeed.runtime.progressive_layer_drop`` (ds-data's)."""

from ds_data import ProgressiveLayerDrop

__all__ = ["ProgressiveLayerDrop"]
