"""``deepspeed.checkpoint``: checkpoint helpers under DeepSpeed's path (the format is ds_ckpt's);
``ds_to_universal`` converts DeepSpeed's own ZeRO checkpoints into it, and ``constants`` names
the keys of DeepSpeed's files (exported here too, as DeepSpeed does)."""

from ds_all.checkpoint import constants, utils
from ds_all.checkpoint.constants import *  # noqa: F403  (DeepSpeed's package exports them)

__all__ = ["constants", "utils", *constants.__all__]  # noqa: PLE0604
