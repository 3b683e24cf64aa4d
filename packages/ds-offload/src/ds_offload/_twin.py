"""Twin-flow partial offload (ZeRO-Offload++): which partitions stay on the device, and their
update there while the CPU updates the others.

``offload_optimizer.ratio`` is DeepSpeed's: the fraction of the optimizer state offloaded to the
CPU (stepped by CPU Adam); the rest stays on the device with its fp32 master and moments and is
stepped by the fused device optimizer. As in DeepSpeed, the device keeps the *first* part of the
model in parameter order and the CPU gets the last ``ratio`` of it. DeepSpeed splits its
``sub_group_size`` sub-groups (default 1e9 elements, so a 1.3B model has two and ``ratio: 0.5``
keeps three quarters on the device); here the split is by elements over ZeRO's buckets, so the
fraction is the one asked for to within one bucket. ``"auto"`` (ds_offload extension) chooses it
from the device memory free at setup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ds_offload._hparams import read_hparams

# bytes per element a partition kept on the device holds that full offload would not: the
# fp32 master (not freed) and the two fp32 Adam moments
DEVICE_BYTES_PER_ELEMENT = 12
# share of the free device memory "auto" gives to kept optimizer state; the rest stays for
# activations, gradients and the allocator's fragmentation
AUTO_HEADROOM_SHARE = 0.5


class _Partition(Protocol):
    index: int
    group_index: int
    master: torch.Tensor
    param_shard: torch.Tensor | None


def model_order(part: Any) -> int:
    """Position of the partition's first parameter in the model (ds_zero's
    ``MasterPartition.order``); the partition index where the caller gives none."""
    order = getattr(part, "order", None)
    return part.index if order is None or order < 0 else int(order)


def resolve_ratio(ratio: float | str, partitions: Sequence[_Partition]) -> float:
    """The offloaded fraction: ``ratio`` itself, or for "auto" the fraction that leaves the
    device state within ``AUTO_HEADROOM_SHARE`` of the device memory free now (1.0 on CPU)."""
    if ratio != "auto":
        return float(ratio)
    total = sum(p.master.numel() for p in partitions)
    devices = {p.master.device for p in partitions}
    if total == 0 or len(devices) != 1 or next(iter(devices)).type == "cpu":
        return 1.0
    from ds_accel import get_accelerator

    device = next(iter(devices))
    free = get_accelerator().available_memory(device.index)
    keep = AUTO_HEADROOM_SHARE * free / DEVICE_BYTES_PER_ELEMENT
    return min(1.0, max(0.0, 1.0 - keep / total))


def split(partitions: Sequence[_Partition], ratio: float) -> tuple[list[int], list[int]]:
    """(offloaded, on_device) partition indices: the device keeps partitions from the front of
    the model while their elements stay within ``1 - ratio`` of the total (a partition counts
    as fitting when at least half of it does)."""
    total = sum(p.master.numel() for p in partitions)
    budget = (1.0 - ratio) * total
    kept, on_device, offloaded = 0, [], []
    for part in sorted(partitions, key=model_order):
        n = part.master.numel()
        if ratio < 1.0 and kept + n / 2 <= budget:
            on_device.append(part.index)
            kept += n
        else:
            offloaded.append(part.index)
    return sorted(offloaded), sorted(on_device)


class DeviceFlow:
    """The device half of twin-flow: the kept partitions' fp32 masters stay where they are and
    one fused optimizer (ds_kernels' FusedAdam on an accelerator, torch's Adam/AdamW on the
    CPU) steps them all in a few multi-tensor launches, queued on the current stream so the
    device updates while the CPU steps its own partitions."""

    def __init__(
        self,
        parts: Sequence[_Partition],
        group_options: Sequence[dict[str, Any]],
        kind: str,
        defaults: dict[str, Any],
        steps: dict[int, torch.Tensor],
    ) -> None:
        self.parts = list(parts)
        self.group_options = group_options
        self.kind = kind
        self.defaults = defaults
        self.steps = steps
        groups: dict[int, list[torch.Tensor]] = {}
        for part in self.parts:
            groups.setdefault(part.group_index, []).append(part.master)
        param_groups = [{"params": ps, "_gi": gi} for gi, ps in groups.items()]
        decoupled = kind == "adamw"
        device = self.parts[0].master.device
        self.fused = device.type != "cpu"
        if self.fused:
            from ds_kernels import FusedAdam

            self.optimizer: torch.optim.Optimizer = FusedAdam(param_groups, adam_w_mode=decoupled)
        else:
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            self.optimizer = cls(param_groups, lr=1e-3, foreach=False)
        for part in self.parts:
            # state made now: checkpoints can be loaded before the first step
            self.optimizer.state[part.master] = {
                "step": torch.zeros(
                    (), dtype=torch.float32, device=device if self.fused else "cpu"
                ),
                "exp_avg": torch.zeros_like(part.master),
                "exp_avg_sq": torch.zeros_like(part.master),
            }

    def step(
        self, grads: dict[int, torch.Tensor], scale: float | None, writer_of: Callable
    ) -> None:
        opt = self.optimizer
        for g in opt.param_groups:
            h = read_hparams(self.kind, self.group_options[g["_gi"]], self.defaults)
            if h.decoupled != (self.kind == "adamw"):
                raise ValueError(
                    "offload_optimizer.ratio < 1: the device partitions are stepped by one "
                    f"{'AdamW' if self.kind == 'adamw' else 'Adam'}; a param group overriding "
                    "decoupled_weight_decay is not supported there"
                )
            g.update(lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)
        mine = [grads[p.index] for p in self.parts]
        if scale is not None and scale != 1.0:
            # the gradients are not read again (the offloaded ones are copied elsewhere)
            torch._foreach_mul_(mine, scale)
        for part, grad in zip(self.parts, mine):
            part.master.grad = grad
        opt.step()
        for part in self.parts:
            part.master.grad = None
            self.steps[part.index] += 1
            self._write(part, writer_of(part))

    @staticmethod
    def _write(part: _Partition, writer: Callable[[torch.Tensor], None] | None) -> None:
        if writer is not None:
            writer(part.master.reshape(-1))
        elif part.param_shard is not None:
            part.param_shard.reshape(-1).copy_(part.master.reshape(-1))

    def state(self, part: _Partition) -> dict[str, torch.Tensor]:
        st = self.optimizer.state[part.master]
        return {"master": part.master, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}

    def loaded(self) -> None:
        """Checkpoint data was written into the masters, moments and step counters."""
        for part in self.parts:
            self.optimizer.state[part.master]["step"].fill_(float(self.steps[part.index]))
