"""``deepspeed.moe.sharded_moe``: DeepSpeed's gating functions on dense GShard tensors.

``TopKGate`` / ``MOELayer`` are not here: ds-moe's router (``ds_moe.TopKGate``) takes a
``GateConfig`` and returns a ``Routing``, and its layer is ``deepspeed.moe.layer.MoE``."""

from ds_moe import einsum, gumbel_rsample, multiplicative_jitter, top1gating, top2gating, topkgating
from ds_moe._gating import USE_EINSUM, _capacity

__all__ = [
    "USE_EINSUM",
    "_capacity",
    "einsum",
    "gumbel_rsample",
    "multiplicative_jitter",
    "top1gating",
    "top2gating",
    "topkgating",
]
