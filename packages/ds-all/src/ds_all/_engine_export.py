"""Whole-model weights out of a ZeRO engine: the 16-bit consolidated state dict DeepSpeed's
``_zero3_consolidated_16bit_state_dict`` returns and the file ``save_16bit_model`` writes."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

import ds_zero


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def consolidated_state_dict(
    zero: ds_zero.Zero, module: nn.Module, exclude_frozen_parameters: bool = False
) -> OrderedDict[str, torch.Tensor] | None:
    """Every parameter whole, in the compute dtype, plus persistent buffers, on the CPU of
    rank 0 (None on other ranks; a collective: every rank must call it). Tied parameters
    appear under each of their names, as in ``module.state_dict()``."""
    full = zero.full_state_dict(dtype=zero.param_dtype)
    if _rank() != 0:
        return None
    canonical = {id(p): name for name, p in module.named_parameters()}
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in module.state_dict(keep_vars=True).items():
        name = canonical.get(id(value))
        if name is None:  # a persistent buffer
            out[key] = value.detach().cpu().clone()
        elif not (exclude_frozen_parameters and id(value) in frozen):
            out[key] = full[name].cpu()
    return out


def module_state_dict(
    module: nn.Module, exclude_frozen_parameters: bool = False
) -> OrderedDict[str, torch.Tensor]:
    """Stages 0-2: the module's own (whole) weights, each an independent CPU copy (ZeRO's
    parameters are views of flat buffers; saving a view would write the whole buffer)."""
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    return OrderedDict(
        (k, v.detach().cpu().clone())
        for k, v in module.state_dict(keep_vars=True).items()
        if not (exclude_frozen_parameters and id(v) in frozen)
    )


def write_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    """``.safetensors`` names get a safetensors file (tied tensors stored once per name);
    other names (DeepSpeed's default ``pytorch_model.bin``) get ``torch.save`` of plain
    tensors, which ``torch.load(weights_only=True)`` reads."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in state.items()}, path)
    else:
        torch.save(dict(state), path)
