"""Training FLOPs and model FLOPs utilization from a measured forward."""

from __future__ import annotations


def training_flops_per_step(forward_flops: float, recompute_fwd_factor: float = 0.0) -> float:
    """FLOPs of forward + backward: the backward of a product costs two products (gradient of
    the input and of the weight), so a step costs (3 + recomputed share of the forward) x the
    forward. This is DeepSpeed's convention and the usual one for MFU; the measured backward
    (``FlopsProfiler.get_total_backward_flops``) is lower by one product for layers whose input
    needs no gradient (the first layer)."""
    if not 0.0 <= recompute_fwd_factor <= 1.0:
        raise ValueError(f"recompute_fwd_factor must be in [0, 1], got {recompute_fwd_factor}")
    return (3.0 + recompute_fwd_factor) * forward_flops
