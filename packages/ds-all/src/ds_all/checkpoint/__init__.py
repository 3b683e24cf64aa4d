"""``deepspeed.checkpoint``: checkpoint helpers under DeepSpeed's path (the format is ds_ckpt's)."""

from ds_all.checkpoint import utils

__all__ = ["utils"]
