"""``deepspeed.moe.mappings``: token gather/drop across tensor-parallel ranks around experts.

ds-all's groups have tensor-parallel world size 1 (``deepspeed.utils.groups``), where
DeepSpeed's functions return their input unchanged; they do the same here and refuse a
tensor-parallel world larger than one rather than silently skip the exchange."""

from __future__ import annotations

import torch

from ds_all.utils import groups


def _tp_world_size() -> int:
    return groups.get_tensor_model_parallel_world_size()


def _identity_or_refuse(input_: torch.Tensor, what: str) -> torch.Tensor:
    size = _tp_world_size()
    if size != 1:
        raise NotImplementedError(
            f"deepspeed.moe.mappings.{what}: tensor-parallel world size {size} > 1 is not "
            "supported by ds-moe (no expert tensor parallelism); run MoE without tensor "
            "parallelism"
        )
    return input_


def gather_tokens(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """All-gather tokens over the tensor-parallel ranks (the input itself at tp = 1)."""
    return _identity_or_refuse(input_, "gather_tokens")


def drop_tokens(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This tensor-parallel rank's share of the tokens (the input itself at tp = 1)."""
    return _identity_or_refuse(input_, "drop_tokens")


__all__ = ["drop_tokens", "gather_tokens"]
