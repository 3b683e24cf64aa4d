"""Persistent module buffers (BatchNorm statistics, ...) in engine checkpoints.

ZeRO's fragments cover parameters only; buffers are replicated, so rank 0 writes each one
whole under its ``state_dict`` name and every rank reads it back. ``zero_to_fp32`` then returns
them too, as DeepSpeed's tool does."""

from __future__ import annotations

import torch
from torch import nn

import ds_ckpt


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``module.state_dict()`` holds, by their state-dict names."""
    params = {id(p) for p in module.parameters()}
    return {
        k: v
        for k, v in module.state_dict(keep_vars=True).items()
        if id(v) not in params and isinstance(v, torch.Tensor)
    }


def buffer_fragments(module: nn.Module, rank: int) -> list[ds_ckpt.Fragment]:
    """What this rank writes: every persistent buffer on rank 0, nothing elsewhere."""
    if rank != 0:
        return []
    return [ds_ckpt.Fragment.whole(k, v.detach()) for k, v in persistent_buffers(module).items()]


@torch.no_grad()
def load_buffers(module: nn.Module, load_dir: str, tag: str, saved: set[str]) -> None:
    """Copy the saved buffers into the module's (names the checkpoint lacks are left as they
    are: a checkpoint of an older engine, or a buffer added since)."""
    wanted = {k: v for k, v in persistent_buffers(module).items() if k in saved}
    if not wanted:
        return
    staged = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in wanted.items()}
    ds_ckpt.load(load_dir, tag, [ds_ckpt.Fragment.whole(k, t) for k, t in staged.items()])
    for k, v in wanted.items():
        v.copy_(staged[k])
