"""``deepspeed.moe.experts``: DeepSpeed's ``Experts`` container (ds-moe's port)."""

from ds_moe import Experts

__all__ = ["Experts"]
