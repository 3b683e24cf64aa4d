"""Which linear layers ``init_inference`` splits over the tensor-parallel group, and how:
DeepSpeed 0.19.8's inference AutoTP rules, turned into ds-tp layer specs.

The layers to split come from, in this order:

1. ``injection_policy`` ``{layer class: names}``: in every instance of the class below the top
   level, a linear layer named in the tuple is row-parallel (split on its input features, its
   output summed over the group) and every other linear layer is column-parallel.
2. ``injection_policy_tuple`` alone: those names are the row-parallel layers of the repeated
   layers the parser (4.) finds, in place of the parser's own guesses.
3. the model's ``config.model_type`` when ds-tp has a preset for it: the preset's specs (the
   split DeepSpeed's parser finds for these models, with fused and grouped-expert weights
   handled exactly).
4. DeepSpeed's parser: the classes of the elements of the model's ``nn.ModuleList``\\ s whose
   output projections can be recognised by name (``o_proj``, ``out_proj``, ``down_proj`` and
   a few model-specific ones) or by position (the last linear layer before a LayerNorm).

Within a layer, DeepSpeed's fixed rules apply: MoE routers stay whole, ``gate_up_proj`` is a
fused [gate; up] pair split half by half, any ``down_proj`` is row-parallel. Fused q/k/v
projections (other than through a preset) and embeddings inside a split layer are refused.
The LM head and the model's embeddings stay whole (DeepSpeed splits the LM head's input
features; outputs are the same either way).

A linear layer split this way computes on local heads: the head-count and width attributes
DeepSpeed divides on the modules of a split layer are divided here too.
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ds_all._config_base import ConfigError


class Split(enum.Enum):
    """How one linear layer is split over the group."""

    COLUMN = "column"  #: output features
    ROW = "row"  #: input features; the output is all-reduced
    PACKED = "packed"  #: output features of a fused [gate; up] pair, each half split on its own


@dataclass
class AutoTPPlan:
    """The split of every linear layer AutoTP changes, or a ds-tp preset to apply."""

    splits: dict[str, Split] = field(default_factory=dict)
    #: the split layers (names); their modules get local head counts
    blocks: list[str] = field(default_factory=list)
    preset: str | None = None


#: a norm that follows a linear layer marks it as the output projection of a sub-block
_NORM_KEYS_TOP = ("LayerNorm", "layer_norm", "ln_1", "ln_2")
_NORM_KEYS_NESTED = ("LayerNorm", "layer_norm")
_ROW_NAMES = ("out_proj", "o_proj", "down_proj")
#: (text in the layer's class, text in the linear layer's name) of further output projections
_MODEL_ROWS = (
    ("GPTNeoX", "attention.dense"),
    ("falcon", "self_attention.dense"),
    ("Mixtral", "w2"),
    ("Phi", "self_attn.dense"),
    ("ChatGLM", "self_attention.dense"),
    ("ChatGLM", "dense_4h_to_h"),
)
_FUSED_QKV = ("qkv_proj", "query_key_value", "attn.Wqkv", "self_attn.W_pack", "c_attn")
#: model types DeepSpeed's parser refuses
_UNSUPPORTED_TYPES = ("deberta", "flaubert", "fsmt", "gpt2", "led", "longformer", "xlm", "xlnet")
#: the attributes DeepSpeed divides by the group size on the modules of a split layer
_LOCAL_ATTRS = (
    "n_heads", "inner_dim", "num_heads", "num_kv", "num_attention_heads", "num_attn_heads",
    "all_head_size", "embed_dim", "hidden_size", "num_key_value_heads", "num_kv_heads",
    "kv_n_heads", "d_model", "num_attention_heads_per_partition",
    "num_multi_query_groups_per_partition", "hidden_size_per_partition",
)  # fmt: skip


def plan_autotp(
    model: nn.Module, injection_policy: dict[Any, Any] | None, policy_tuple: Any, *, size: int
) -> AutoTPPlan:
    """The plan for splitting ``model`` over ``size`` ranks; ConfigError naming the key when no
    split can be determined. At size 1 only an injection_policy is planned, to check it."""
    if injection_policy:
        return _plan_from_policy(model, injection_policy, size)
    if policy_tuple is not None:
        rows = _names(policy_tuple, "injection_policy_tuple")
        _check_names_exist(model, rows, "injection_policy_tuple")
        layers = _layer_classes(model)
        if not layers:
            raise ConfigError(
                "injection_policy_tuple: the model has no nn.ModuleList of layers to apply it "
                "to; give injection_policy={LayerClass: names} instead"
            )
        return _plan_blocks(model, {type(m): rows for m in layers.values()}, size)
    import ds_tp

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ds_tp.PRESETS:
        return AutoTPPlan(preset=model_type)
    if model_type in _UNSUPPORTED_TYPES:
        raise ConfigError(
            f"tensor_parallel.tp_size: AutoTP does not split {model_type} models (nor does "
            "DeepSpeed's); set tp_size to 1, or name the row-parallel layers with "
            "injection_policy={LayerClass: ('attn.out_proj', 'mlp.down_proj')}"
        )
    policies = {}
    for layer in _layer_classes(model).values():
        rows = _parsed_rows(layer)
        if rows:
            policies[type(layer)] = tuple(sorted(rows))
    if not policies:
        raise ConfigError(
            f"tensor_parallel.tp_size: AutoTP found no layer to split in "
            f"{type(model).__name__} (it looks for repeated layers in an nn.ModuleList whose "
            "output projections are named o_proj/out_proj/down_proj or precede a LayerNorm); "
            "pass injection_policy={LayerClass: ('attn.out_proj', 'mlp.down_proj')} naming "
            "the row-parallel linear layers"
        )
    return _plan_blocks(model, policies, size)


def _names(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(
        f"{key}: expected the names of the row-parallel linear layers, e.g. "
        f"('self_attn.o_proj', 'mlp.down_proj'), got {value!r} (DeepSpeed's kernel-injection "
        "policy classes are not supported: fused inference kernels are not provided)"
    )


def _check_names_exist(model: nn.Module, names: Collection[str], key: str) -> None:
    modules = [n for n, _ in model.named_modules()]
    for name in names:
        if not any(m.endswith(name) for m in modules):
            raise ConfigError(
                f"{key}: no module of the model is named {name!r} (or ends with it); name the "
                "row-parallel linear layers as model.named_modules() does"
            )


def _plan_from_policy(model: nn.Module, policy: dict[Any, Any], size: int) -> AutoTPPlan:
    if not isinstance(policy, dict):
        raise ConfigError(f"injection_policy: expected {{LayerClass: names}}, got {policy!r}")
    rows: dict[type, tuple[str, ...]] = {}
    for cls, names in policy.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(
                f"injection_policy: key {cls!r} is not an nn.Module class; map each layer "
                "class of the model to the names of its row-parallel linear layers"
            )
        rows[cls] = _names(names, f"injection_policy[{cls.__name__}]")
        _check_names_exist(model, rows[cls], f"injection_policy[{cls.__name__}]")
    plan = _plan_blocks(model, rows, size)
    found = {type(model.get_submodule(b)) for b in plan.blocks}
    for cls in rows:
        if cls not in found:
            raise ConfigError(
                f"injection_policy: the model has no {cls.__name__} module below its top level; "
                "name the class of the model's repeated layers"
            )
    return plan


def _layer_classes(model: nn.Module) -> dict[str, nn.Module]:
    """The first instance of each class of the elements of the model's ModuleLists (not
    looking inside those elements)."""
    found: dict[str, nn.Module] = {}
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for layer in child.children():
                found.setdefault(type(layer).__name__, layer)
        else:
            for name, layer in _layer_classes(child).items():
                found.setdefault(name, layer)
    return found


def _entries(module: nn.Module, parent: str | None) -> list[str | None]:
    """The layer's linear layers in registration order, each as DeepSpeed names it (its
    parent's attribute and its own: ``self_attn.o_proj``, ``.fc`` for a direct child), with
    None for each norm."""
    norm_keys = _NORM_KEYS_TOP if parent is None else _NORM_KEYS_NESTED
    out: list[str | None] = []
    for key, sub in module.named_children():
        if isinstance(sub, nn.Linear):
            out.append(f"{parent or ''}.{key}")
        elif isinstance(sub, nn.LayerNorm) or key in norm_keys:
            out.append(None)
        else:
            out += _entries(sub, key)
    return out


def _parsed_rows(layer: nn.Module) -> set[str]:
    entries = _entries(layer, None)
    kind = str(type(layer))
    rows: set[str] = set()
    for i, entry in enumerate(entries):
        if entry is None:
            # at i == 0 this reads the layer's last entry: a norm that opens a pre-norm layer
            # follows the previous layer's output projection
            before = entries[i - 1]
            if before is not None:
                rows.add(before)
        elif any(n in entry for n in _ROW_NAMES) or any(
            k in kind and n in entry for k, n in _MODEL_ROWS
        ):
            rows.add(entry)
    return rows


def _plan_blocks(model: nn.Module, rows: dict[type, tuple[str, ...]], size: int) -> AutoTPPlan:
    """Every instance of a class of ``rows`` (not looking inside one), split."""
    plan = AutoTPPlan()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child) in rows:
                plan.blocks.append(full)
                _split_block(full, child, rows[type(child)], plan.splits, size)
            else:
                visit(child, f"{full}.")

    visit(model, "")
    return plan


def _split_block(
    block_name: str, block: nn.Module, rows: tuple[str, ...], splits: dict[str, Split], size: int
) -> None:
    kind = str(type(block))
    for rel, sub in block.named_modules():
        if isinstance(sub, nn.Embedding) and size > 1:
            raise ConfigError(
                f"tensor_parallel.tp_size: {block_name}.{rel} is an embedding inside a layer "
                "AutoTP splits; splitting it is not implemented; set tp_size to 1"
            )
        if not rel or not isinstance(sub, nn.Linear):
            continue
        parent, _, attr = rel.rpartition(".")
        short = f"{parent.rpartition('.')[2]}.{attr}"
        split = _linear_split(short, rel, rows, kind, size)
        if split is not None:
            splits[f"{block_name}.{rel}"] = split


def _linear_split(
    short: str, rel: str, rows: tuple[str, ...], kind: str, size: int
) -> Split | None:
    router = short in ("mlp.gate", "block_sparse_moe.gate") or (
        "qwen2_moe" in kind and short == "mlp.shared_expert_gate"
    )
    if router or "q_a_proj" in short or "kv_a_proj_with_mqa" in short:
        return None  # small or low-rank projections every rank keeps whole
    if "gate_up_proj" in short:
        return Split.PACKED
    named = any(
        short == r or rel == r.lstrip(".") or rel.endswith("." + r.lstrip(".")) for r in rows
    )
    if named or "down_proj" in short:
        return Split.ROW
    if size > 1 and any(f in short for f in _FUSED_QKV):
        raise ConfigError(
            f"tensor_parallel.tp_size: {rel} is a fused q/k/v projection; splitting it is "
            "implemented only for the ds-tp presets (llama, qwen2, mixtral, phi3); set tp_size "
            "to 1"
        )
    return Split.COLUMN


# --------------------------------------------------------------------------- applying a plan
def _generalized(name: str) -> str:
    """A pattern matching the weight of ``name`` in every element of its ModuleLists."""
    parts = (r"\d+" if p.isdigit() else re.escape(p) for p in name.split("."))
    return "^" + r"\.".join(parts) + r"\.weight$"


def _specs(model: nn.Module, splits: dict[str, Split]) -> list[Any]:
    """One spec per layer position (``layers.\\d+.mlp.down_proj``) where every module at that
    position gets the same split; an exact name elsewhere (a position shared by classes that
    split differently, or holding a module that stays whole)."""
    from ds_tp import PartitionType, TPLayerSpec

    owners: dict[str, set[str]] = defaultdict(set)
    for name, module in model.named_modules():
        if name and isinstance(module._parameters.get("weight"), torch.Tensor):
            owners[_generalized(name)].add(name)
    kinds: dict[str, set[Split]] = defaultdict(set)
    for name, split in splits.items():
        kinds[_generalized(name)].add(split)
    specs, seen = [], set()
    for name, split in splits.items():
        pattern = _generalized(name)
        if len(kinds[pattern]) > 1 or not owners[pattern].issubset(splits):
            pattern = "^" + re.escape(f"{name}.weight") + "$"
        if pattern in seen:
            continue
        seen.add(pattern)
        if split is Split.ROW:
            specs.append(TPLayerSpec([pattern], PartitionType.ROW))
        elif split is Split.PACKED:
            specs.append(
                TPLayerSpec([pattern], PartitionType.COLUMN, shape=(2, -1), partition_dim=0)
            )
        else:
            specs.append(TPLayerSpec([pattern], PartitionType.COLUMN))
    return specs


def _module_list_elements(model: nn.Module) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            out += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return out


def apply_autotp(model: nn.Module, plan: AutoTPPlan, group: Any, size: int) -> None:
    """Split ``model`` in place over ``group`` (of ``size`` ranks) as ``plan`` says."""
    import ds_tp

    blocks = plan.blocks or _module_list_elements(model)
    before = _attributes(model, blocks)
    config = None
    if plan.preset is None:
        config = ds_tp.AutoTPConfig(layer_specs=_specs(model, plan.splits), use_default_specs=False)
    try:
        ds_tp.autotp(model, group, partition_config=config, preset_model=plan.preset)
    except ValueError as e:
        raise ConfigError(f"tensor_parallel.tp_size {size}: {e}") from None
    _localize(model, before, size)


def _attributes(model: nn.Module, blocks: list[str]) -> dict[tuple[str, str], int]:
    """The integer attributes of ``_LOCAL_ATTRS`` on the modules inside each block (before
    ds-tp divides some of them: the division below starts from these values)."""
    out = {}
    for block in blocks:
        for rel, module in model.get_submodule(block).named_modules():
            if not rel:
                continue
            for attr in _LOCAL_ATTRS:
                v = vars(module).get(attr)
                if isinstance(v, int) and not isinstance(v, bool):
                    out[(f"{block}.{rel}", attr)] = v
    return out


def _holds_split(module: nn.Module) -> bool:
    """DeepSpeed's rule: a module whose subtree holds a split parameter and which holds no
    weight of three or more dimensions (those stay whole, and so do the sizes describing them)."""
    if not any(getattr(p, "tensor_model_parallel", False) for p in module.parameters()):
        return False
    mine = list(module.parameters(recurse=False))
    for child in module.children():
        mine += list(child.parameters(recurse=False))
    return not any(p.dim() >= 3 for p in mine)


def _localize(model: nn.Module, before: dict[tuple[str, str], int], size: int) -> None:
    import ds_tp

    for (name, attr), value in before.items():
        module = model.get_submodule(name)
        if isinstance(module, (ds_tp.ColumnParallelLinear, ds_tp.RowParallelLinear)):
            continue  # a replaced linear layer: its sizes are its own
        if not _holds_split(module):
            continue
        if value % size:
            raise ConfigError(
                f"tensor_parallel.tp_size {size}: {name}.{attr} is {value}, which {size} ranks "
                "cannot share evenly; choose a tp_size that divides it"
            )
        setattr(module, attr, value // size)
