"""``deepspeed.runtime.engine``: the training engine (ds_all's)."""

from ds_all._engine import DeepSpeedEngine

__all__ = ["DeepSpeedEngine"]
