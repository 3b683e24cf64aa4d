"""AutoTP: split an existing model's layers over a tensor-parallel group, in place.

Each ``nn.Linear`` whose weight name matches a layer spec is replaced by a
:class:`ColumnParallelLinear` or :class:`RowParallelLinear` holding this rank's slice (of each
fused sub-parameter). A module holding 3-D expert weights (transformers' grouped experts) has
its matched parameters sliced in place and its input/output wrapped in the copy/reduce regions.
Attention modules get their head counts divided by the group size (attributes and, for
Hugging Face modules, a module-local copy of the config), so their reshapes see local heads.

Sizes that do not divide the group size are refused before anything is changed, naming the
layer and the sizes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ds_tp._autotp_config import (
    PRESETS,
    AutoTPConfig,
    PartitionType,
    TPLayerSpec,
    resolve_partition_config,
)
from ds_tp._layers import ColumnParallelLinear, RowParallelLinear, mark_tp_param
from ds_tp._mappings import copy_to_tp_region, group_rank, group_size, reduce_from_tp_region
from ds_tp._shard import TPShard, check_divisible

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_heads")
_CONFIG_HEADS = ("num_attention_heads", "num_key_value_heads")


@dataclass
class _Plan:
    """One planned change: a Linear to replace, or a module's raw parameter to slice."""

    module_name: str
    param_name: str  # full parameter name the spec matched
    spec: TPLayerSpec
    dim: int
    sub_sizes: tuple[int, ...]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _plan(
    model: nn.Module, config: AutoTPConfig, world: int, model_type: str | None
) -> list[_Plan]:
    plans: list[_Plan] = []
    unmatched: list[str] = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            spec = config.find_matching_spec(full, model_type)
            is_linear = isinstance(module, nn.Linear) and pname == "weight"
            if spec is None:
                if is_linear:
                    unmatched.append(mname)
                continue
            if spec.partition_type is PartitionType.SKIP:
                continue
            if isinstance(module, nn.Linear) and pname != "weight":
                continue  # a Linear's bias follows its weight
            dim = spec.get_partition_dim()
            if is_linear:
                want = 0 if spec.partition_type is PartitionType.COLUMN else 1
                if dim != want:
                    raise ValueError(
                        f"{full}: a {spec.partition_type.value}-parallel Linear splits weight "
                        f"dimension {want}, but the spec says partition_dim {dim}"
                    )
            if spec.shape is not None and len(spec.shape) != p.dim():
                raise ValueError(
                    f"{full}: spec shape {list(spec.shape)} has {len(spec.shape)} dimensions but "
                    f"the weight has shape {tuple(p.shape)}; give one entry per dimension"
                )
            if dim >= p.dim():
                raise ValueError(
                    f"{full}: partition_dim {dim} out of range for shape {tuple(p.shape)}"
                )
            subs = spec.sub_sizes(p.shape[dim], full)
            for s in subs:
                check_divisible(
                    full,
                    f"dimension {dim} ({'sub-parameter ' if len(subs) > 1 else ''}size)",
                    s,
                    world,
                )
            plans.append(_Plan(mname, full, spec, dim, subs))
    if config.strict_mode and unmatched:
        raise ValueError(
            f"AutoTP strict_mode: Linear layers matched by no layer spec: {unmatched[:8]}"
            f"{' ...' if len(unmatched) > 8 else ''}; add specs (partition_type 'skip' to keep one whole)"
        )
    return plans


def _check_heads(model: nn.Module, world: int, sharded_parents: set[str]) -> None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in _CONFIG_HEADS:
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            check_divisible(f"model config ({type(cfg).__name__})", key, v, world)
    for name in sharded_parents:
        module = model.get_submodule(name) if name else model
        for attr in _HEAD_ATTRS:
            v = getattr(module, attr, None)
            if isinstance(v, int):
                check_divisible(name or type(module).__name__, attr, v, world)


def _localize_heads(module: nn.Module, world: int) -> None:
    for attr in _HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            setattr(module, attr, v // world)
    cfg = getattr(module, "config", None)
    if cfg is not None and any(isinstance(getattr(cfg, k, None), int) for k in _CONFIG_HEADS):
        # a module-local copy: attention code that reads config.num_attention_heads (Phi-3's
        # fused qkv split) sees the local heads, the rest of the model keeps the full config
        local = copy.copy(cfg)
        for k in _CONFIG_HEADS:
            v = getattr(cfg, k, None)
            if isinstance(v, int):
                setattr(local, k, v // world)
        module.config = local


def _wrap_experts(module: nn.Module, group: Any) -> None:
    """The experts module computes a column-then-row product per expert: its output is a
    partial sum, added over the group. Every floating-point input enters the copy region:
    the hidden states, and also the routing weights, whose gradient (the dot product of the
    output gradient with each expert's partial output) is partial on each rank too."""

    def enter(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return copy_to_tp_region(v, group)
        return v

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return tuple(enter(a) for a in args), {k: enter(v) for k, v in kwargs.items()}

    def post(_m: nn.Module, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (reduce_from_tp_region(out[0], group), *out[1:])
        return reduce_from_tp_region(out, group)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post)


def autotp(
    model: nn.Module,
    tp_group: Any,
    *,
    partition_config: dict[str, Any] | AutoTPConfig | None = None,
    preset_model: str | None = None,
) -> nn.Module:
    """Shard ``model`` in place over ``tp_group`` and return it.

    ``preset_model``: one of ``llama``, ``qwen2``, ``mixtral``, ``phi3``; ``partition_config``:
    DeepSpeed's dict (``layer_specs`` ...); without either, the preset named by the model's
    ``config.model_type`` when there is one. Every rank must hold the same full model (same
    seed or the same checkpoint) before the call. Layers not matched stay replicated."""
    world = group_size(tp_group)
    model_cfg = getattr(model, "config", None)
    model_type = getattr(model_cfg, "model_type", None)
    if partition_config is None and preset_model is None:
        if model_type in PRESETS:
            preset_model = model_type
        else:
            raise ValueError(
                f"AutoTP: no preset_model or partition_config, and the model type {model_type!r} "
                f"is not a preset ({list(PRESETS)}); set tensor_parallel.preset_model or "
                "tensor_parallel.partition_config"
            )
    text_cfg = getattr(model_cfg, "text_config", None) or model_cfg
    config = resolve_partition_config(partition_config, preset_model, text_cfg)
    plans = _plan(model, config, world, model_type)
    if not plans:
        raise ValueError(
            "AutoTP: no parameter of the model matches the layer specs; check the patterns "
            "against model.named_parameters() names"
        )
    attn_parents = {_parent_name(p.module_name) for p in plans if isinstance(
        model.get_submodule(p.module_name), nn.Linear)}  # fmt: skip
    _check_heads(model, world, attn_parents)
    # at tp=1 the layers are still replaced (plain matmuls, no collectives): the model has the
    # same structure at every size, and the wrappers' cost can be measured against the plain one
    rank = group_rank(tp_group)
    experts: dict[str, nn.Module] = {}
    for plan in plans:
        module = model.get_submodule(plan.module_name)
        short = plan.param_name
        if isinstance(module, nn.Linear):
            parent, child = _parent(model, plan.module_name)
            if plan.spec.partition_type is PartitionType.COLUMN:
                new: nn.Module = ColumnParallelLinear.from_linear(
                    module, tp_group, gather_output=plan.spec.gather_output,
                    sub_sizes=plan.sub_sizes, name=short,
                )  # fmt: skip
            else:
                new = RowParallelLinear.from_linear(module, tp_group, name=short)
            new.to(module.weight.device)
            setattr(parent, child, new)
        else:
            pname = plan.param_name.rpartition(".")[2]
            p = getattr(module, pname)
            shard = TPShard(tuple(p.shape), plan.dim, plan.sub_sizes, rank, world)
            p.data = shard.shard(p.detach())  # same Parameter: optimizers built earlier hold it
            mark_tp_param(p, shard, tp_group)
            experts[plan.module_name] = module
    for module in experts.values():
        _wrap_experts(module, tp_group)
    for name in attn_parents:
        _localize_heads(model.get_submodule(name) if name else model, world)
    model.ds_autotp_parsed = True  # type: ignore[attr-defined]
    return model


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a model sharded by :func:`autotp` (every rank of the group
    gets the full tensors; a collective over each sharded parameter's group)."""
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        shard = getattr(t, "ds_tp_shard", None)
        if shard is None:
            out[name] = t.detach().clone()
            continue
        group = getattr(t, "ds_tp_group", None)
        parts = [torch.empty_like(t.detach()) for _ in range(shard.world)]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        out[name] = _assemble(parts, shard)
    return out


def _assemble(parts: list[torch.Tensor], shard: TPShard) -> torch.Tensor:
    full = torch.empty(shard.full_shape, dtype=parts[0].dtype, device=parts[0].device)
    for r, part in enumerate(parts):
        s = TPShard(shard.full_shape, shard.dim, shard.sub_sizes, r, shard.world)
        for g, lo, n in s.global_ranges(0, part.numel()):
            full.view(-1)[g : g + n] = part.reshape(-1)[lo : lo + n]
    return full
