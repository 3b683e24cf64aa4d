"""A minimal stand-in for ds_zero's side of the PartitionStepper protocol (ds_offload may not
import ds_zero): the model's parameters become views of one flat fp32 buffer, split into
partitions; this rank owns some of them (world > 1: gradients all-reduced, owned partitions
stepped, updated slices all-gathered)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Part:
    index: int
    group_index: int
    master: torch.Tensor
    param_shard: torch.Tensor | None


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)
    )


def batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


class FlatDriver:
    """fp32 params as views of one flat buffer, ``nparts`` partitions of it. With ``lp_dtype``,
    each partition also has a low-precision param shard (like ZeRO's bf16 compute copy)."""

    def __init__(
        self, model: nn.Module, nparts: int, group_of=None, lp_dtype=None, world=1, rank=0
    ):
        self.model = model
        self.params = list(model.parameters())
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n)
        off = 0
        for p in self.params:
            k = p.numel()
            self.flat[off : off + k].copy_(p.detach().reshape(-1))
            p.data = self.flat[off : off + k].view(p.shape)
            off += k
        bounds = [round(i * n / nparts) for i in range(nparts + 1)]
        self.bounds = list(zip(bounds[:-1], bounds[1:]))
        self.world, self.rank = world, rank
        self.owned = [i for i in range(nparts) if i % world == rank]
        self.parts = []
        for j, i in enumerate(self.owned):
            lo, hi = self.bounds[i]
            gi = group_of(lo) if group_of else 0
            shard = torch.zeros(hi - lo, dtype=lp_dtype) if lp_dtype is not None else None
            if shard is not None:
                shard.copy_(self.flat[lo:hi])
            self.parts.append(Part(j, gi, self.flat[lo:hi], shard))

    def grads(self) -> list[torch.Tensor]:
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        if self.world > 1:
            dist.all_reduce(g)
            g /= self.world
        return [g[self.bounds[i][0] : self.bounds[i][1]].clone() for i in self.owned]

    def sync(self) -> None:
        """Every rank gets every partition's updated values (owner broadcasts)."""
        if self.world > 1:
            for i, (lo, hi) in enumerate(self.bounds):
                dist.broadcast(self.flat[lo:hi], src=i % self.world)
        for p in self.params:
            p.grad = None


def reference_params(model: nn.Module, opt: torch.optim.Optimizer, steps: int, world: int = 1):
    """Plain training: averaged gradient of ``world`` ranks' batches, torch optimizer."""
    for s in range(steps):
        opt.zero_grad()
        for r in range(world):
            x, y = batch(s, r)
            (nn.functional.mse_loss(model(x), y) / world).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def offload_train(driver: FlatDriver, stepper, steps: int, on_step=None):
    for s in range(steps):
        x, y = batch(s, driver.rank)
        nn.functional.mse_loss(driver.model(x), y).backward()
        grads = driver.grads()
        for part, g in zip(driver.parts, grads):
            stepper.grad_ready(part.index, g)
        stepper.step(grads)
        driver.sync()
        if on_step is not None:
            on_step(s)
    return driver.flat.clone()
