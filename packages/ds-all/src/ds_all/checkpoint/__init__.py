"""``deepspeed.checkpoint``: checkpoint helpers under DeepSpeed's path (the format is ds_ckpt's);
``ds_to_universal`` converts DeepSpeed's own ZeRO checkpoints into it."""

from ds_all.checkpoint import utils

__all__ = ["utils"]
