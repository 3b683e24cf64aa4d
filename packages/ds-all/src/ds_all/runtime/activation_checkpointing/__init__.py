"""``deepspeed.runtime.activation_checkpointing``: activation checkpointing under DeepSpeed's
path; its ``checkpointing`` module is ``ds_all.checkpointing`` itself."""

from ds_all.runtime.activation_checkpointing import checkpointing

__all__ = ["checkpointing"]
