"""Pyramid MoE (PR-MoE): a different number of experts per layer, usually more in later layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ds_moe._layer import MoE


def pyramid_moe_layers(
    hidden_size: int,
    expert: nn.Module,
    num_experts: Sequence[int],
    ep_size: int | Sequence[int] = 1,
    **moe_kwargs: Any,
) -> nn.ModuleList:
    """One ``MoE`` per entry of ``num_experts`` (e.g. ``[32, 32, 64, 64]``).

    ``ep_size`` is one int for every layer or one per layer; a layer whose expert count an int
    ``ep_size`` does not divide gets an error naming the layer. Layers with the same ep_size
    share their process groups. Pass ``use_residual=True`` for PR-MoE's residual experts.
    """
    counts = list(num_experts)
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"num_experts={num_experts!r} must be a non-empty list of positive ints")
    sizes = [ep_size] * len(counts) if isinstance(ep_size, int) else list(ep_size)
    if len(sizes) != len(counts):
        raise ValueError(
            f"ep_size has {len(sizes)} entries but num_experts has {len(counts)}; give one "
            "ep_size per layer or a single int"
        )
    layers = []
    for i, (n, p) in enumerate(zip(counts, sizes)):
        if n % p:
            raise ValueError(
                f"layer {i}: num_experts={n} is not divisible by ep_size={p}; give this layer "
                "a multiple of ep_size experts or a per-layer ep_size list"
            )
        layers.append(MoE(hidden_size, expert, num_experts=n, ep_size=p, **moe_kwargs))
    return nn.ModuleList(layers)
