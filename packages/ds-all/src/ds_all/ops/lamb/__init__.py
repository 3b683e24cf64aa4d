"""``deepspeed.ops.lamb``: ``FusedLamb`` (ds_kernels')."""

from ds_kernels import FusedLamb

__all__ = ["FusedLamb"]
