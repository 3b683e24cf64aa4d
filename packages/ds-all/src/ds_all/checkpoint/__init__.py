"""``deepspeed.checkpoint``: checkpoint helpers under DeepSpeed's path (the format is ds_ckpt's)."""
