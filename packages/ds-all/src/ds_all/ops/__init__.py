"""``deepspeed.ops``: optimizers and kernels under DeepSpeed's paths (ds_kernels')."""

from ds_all.ops import adagrad, adam, lamb, lion

__all__ = ["adagrad", "adam", "lamb", "lion"]
