"""``deepspeed.moe.layer``: the ``MoE`` layer (ds-moe's)."""

from ds_moe import MoE

__all__ = ["MoE"]
