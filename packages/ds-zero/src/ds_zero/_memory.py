"""Per-rank model-state memory: the ZeRO paper's formulas, and a measurement of a wrapped model.

The paper (Rajbhandari et al., 2020) counts, for Psi parameters on N ranks with mixed-precision
Adam: stage 0 (2+2+K)Psi, stage 1 2Psi+2Psi+K Psi/N, stage 2 2Psi+(2+K)Psi/N, stage 3
(2+2+K)Psi/N, K = 12 (fp32 master, momentum, variance). The estimate here keeps that structure
but uses the byte sizes this implementation actually holds, so it can be checked against a
measurement: compute parameters of ``param_dtype``; reduced gradients in fp32 partitions (stage
0: whole); an fp32 master unless the parameters are fp32 themselves (then the master is the
parameter storage at stages 0-2, and is the only parameter storage at stage 3); stage 3 keeps
no compute-dtype shard (units are gathered from the master); stages 0-1 with gradient
accumulation hold a whole accumulation buffer of ``reduce_dtype`` between micro-steps.
ZeRO++'s hpZ (``hpz_partition_size`` h > 1, stage 3) adds its secondary partition, 1/h of the
compute-dtype parameters, held from the forward until the optimizer step (counted in ``params``).
Activations and transient gathered units are not model states and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ds_zero._param_meta import full_numel


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank."""

    params: int
    grads: int
    master: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def memory_estimate(
    model: nn.Module | int,
    stage: int,
    world_size: int,
    *,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    optimizer_state_bytes: int = 8,
    gradient_accumulation_steps: int = 1,
    hpz_partition_size: int = 1,
) -> MemoryEstimate:
    """Model-state bytes per rank for ``model`` (or a parameter count) at ``stage`` on
    ``world_size`` ranks. ``optimizer_state_bytes`` per parameter: 8 for Adam/AdamW (two fp32
    moments), 4 for SGD with momentum, 0 for plain SGD. ``hpz_partition_size``: ZeRO++'s hpZ
    group size (stage 3; the secondary partition costs ``param bytes * psi / h``)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"memory_estimate: stage must be 0-3, got {stage}")
    if world_size < 1:
        raise ValueError(f"memory_estimate: world_size must be >= 1, got {world_size}")
    if isinstance(model, int):
        psi = model
    else:
        # full sizes: stage-3 parameters have no elements while released
        psi = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    n = world_size
    p_bytes = _size(param_dtype)
    fp32_params = param_dtype == torch.float32
    shard = psi / n if stage >= 1 else psi
    params = 0 if stage == 3 else p_bytes * psi
    h = min(max(hpz_partition_size, 1), n)
    if stage == 3 and h > 1:
        params = p_bytes * psi / h  # hpZ's secondary partition
    master = 4 * (psi / n if stage == 3 else shard)
    if fp32_params and stage < 3:
        master = 0
    grads = 4 * shard
    if stage <= 1 and gradient_accumulation_steps > 1:
        grads += _size(reduce_dtype) * psi
    optimizer = optimizer_state_bytes * (psi / n if stage >= 1 else psi)
    return MemoryEstimate(int(params), int(grads), int(master), int(optimizer))


def model_state_bytes(zero: object) -> MemoryEstimate:
    """Measure what a wrapped model (``ds_zero.Zero``) holds now, counting each storage once:
    call it right before ``step()`` (gradients present) to compare with ``memory_estimate``."""
    seen: set[int] = set()

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.size() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.size()

    buckets = zero.buckets  # type: ignore[attr-defined]
    params = sum(nbytes(b.flat) + nbytes(b.local_shard) for b in buckets if not b.shard_params)
    params += sum(nbytes(b.local_shard) for b in buckets if b.shard_params and not b.host_shard)
    zeropp = getattr(zero, "zeropp", None)
    if zeropp is not None:  # hpZ secondary partitions, frozen shards stored quantized
        params += sum(nbytes(t) for t in zeropp.secondary.values())
        params += sum(nbytes(c) + nbytes(s) for c, s in zeropp.frozen.values())
    master = sum(nbytes(b.master) for b in buckets)
    grads = sum(nbytes(b.grad_shard) + nbytes(b.accum) for b in buckets)
    optimizer = 0
    stepper = zero.stepper  # type: ignore[attr-defined]
    opt = getattr(stepper, "optimizer", None)
    if opt is not None:
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.numel() > 1:
                    optimizer += nbytes(v)
    return MemoryEstimate(params, grads, master, optimizer)
