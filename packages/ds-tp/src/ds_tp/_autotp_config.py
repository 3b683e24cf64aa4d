"""DeepSpeed's AutoTP partition specs: ``partition_config`` dicts and ``preset_model`` presets.

A layer spec names parameters by regular expressions (``re.match`` against the full parameter
name, e.g. ``model.layers.0.self_attn.q_proj.weight``), says how the layer is split
(``column``: output features, ``row``: input features, ``skip``: replicated) and, for fused
weights, the logical ``shape`` at ``partition_dim``: an int ``n`` for ``n`` equal
sub-parameters (``[2, -1]`` for ``gate_up_proj``) or a list of sizes for unequal ones
(``[[q, k, v], -1]`` for a GQA ``qkv_proj``). The first matching spec wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class PartitionType(Enum):
    """How a layer is split: ``column`` (output features; all-reduce of the input gradient),
    ``row`` (input features; all-reduce of the output), ``skip`` (replicated)."""

    COLUMN = "column"
    ROW = "row"
    SKIP = "skip"


_SPEC_KEYS = {
    "patterns", "partition_type", "shape", "partition_dim", "model_types", "gather_output",
    "grad_allreduce",
}  # fmt: skip
_CONFIG_KEYS = {
    "tp_size", "layer_specs", "embedding_partition_dim", "lm_head_patterns", "use_default_specs",
    "strict_mode",
}  # fmt: skip


def _tuple_shape(shape: Any) -> tuple[Any, ...] | None:
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)):
        raise ValueError(f"AutoTP layer spec: shape must be a list, got {shape!r}")
    return tuple(tuple(s) if isinstance(s, (list, tuple)) else s for s in shape)


@dataclass
class TPLayerSpec:
    """One rule of a ``partition_config`` (DeepSpeed's ``TPLayerSpec``)."""

    patterns: list[str]
    partition_type: PartitionType = PartitionType.COLUMN
    shape: tuple[Any, ...] | None = None
    partition_dim: int | None = None
    model_types: list[str] | None = None
    gather_output: bool = False
    grad_allreduce: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.partition_type, str):
            try:
                self.partition_type = PartitionType(self.partition_type.lower())
            except ValueError:
                raise ValueError(
                    f"AutoTP layer spec {self.patterns}: partition_type {self.partition_type!r} "
                    "is not one of 'column', 'row', 'skip'"
                ) from None
        if isinstance(self.patterns, str) or not self.patterns:
            raise ValueError(
                f"AutoTP layer spec: patterns must be a non-empty list, got {self.patterns!r}"
            )
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"AutoTP layer spec: pattern {p!r} is not a regex: {e}") from None
        self.shape = _tuple_shape(self.shape)
        if self.shape is not None:
            dim = self.get_partition_dim()
            if not 0 <= dim < len(self.shape):
                raise ValueError(
                    f"AutoTP layer spec {self.patterns}: partition_dim {dim} is out of range for "
                    f"shape {list(self.shape)}"
                )
            for i, s in enumerate(self.shape):
                if isinstance(s, tuple):
                    if i != dim or not s or any(not isinstance(v, int) or v <= 0 for v in s):
                        raise ValueError(
                            f"AutoTP layer spec {self.patterns}: a list of sub-parameter sizes is "
                            f"allowed only at partition_dim {dim}, with positive ints; got "
                            f"{list(self.shape)}"
                        )
                elif not isinstance(s, int) or s == 0 or s < -1:
                    raise ValueError(
                        f"AutoTP layer spec {self.patterns}: shape entries must be positive ints "
                        f"or -1, got {list(self.shape)}"
                    )

    def get_partition_dim(self) -> int:
        if self.partition_dim is not None:
            return self.partition_dim
        return 0 if self.partition_type is PartitionType.COLUMN else 1

    def sub_sizes(self, size: int, name: str) -> tuple[int, ...]:
        """Sizes of the fused sub-parameters along the partition dimension of size ``size``."""
        if self.shape is None:
            return (size,)
        s = self.shape[self.get_partition_dim()]
        if isinstance(s, tuple):
            if sum(s) != size:
                raise ValueError(
                    f"{name}: the spec's sub-parameter sizes {list(s)} add up to {sum(s)}, but the "
                    f"partitioned dimension has {size}"
                )
            return s
        if s == -1:
            return (size,)
        if size % s:
            raise ValueError(f"{name}: dimension of {size} cannot hold {s} equal sub-parameters")
        return (size // s,) * s

    def matches(self, param_name: str, model_type: str | None = None) -> bool:
        allowed = {m.lower() for m in self.model_types or ()}
        if allowed and (model_type is None or model_type.lower() not in allowed):
            return False
        return any(re.match(p, param_name) for p in self.patterns)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TPLayerSpec:
        unknown = sorted(set(d) - _SPEC_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; a layer spec takes {sorted(_SPEC_KEYS)}"
            )
        if "patterns" not in d:
            raise ValueError(
                f"{where}: 'patterns' (a list of regexes over parameter names) is required"
            )
        return cls(
            patterns=list(d["patterns"]),
            partition_type=d.get("partition_type", "column"),
            shape=d.get("shape"),
            partition_dim=d.get("partition_dim"),
            model_types=d.get("model_types"),
            gather_output=bool(d.get("gather_output", False)),
            grad_allreduce=bool(d.get("grad_allreduce", False)),
        )


@dataclass
class AutoTPConfig:
    """A set of layer specs (DeepSpeed's ``AutoTPConfig``); ``strict_mode`` refuses a model
    whose ``nn.Linear`` layers are not all matched by a spec."""

    tp_size: int = 1
    layer_specs: list[TPLayerSpec] = field(default_factory=list)
    embedding_partition_dim: int = 1
    lm_head_patterns: list[str] = field(default_factory=lambda: ["lm_head", "embed_out"])
    use_default_specs: bool = True
    strict_mode: bool = False

    def find_matching_spec(
        self, param_name: str, model_type: str | None = None
    ) -> TPLayerSpec | None:
        for spec in self.layer_specs:
            if spec.matches(param_name, model_type):
                return spec
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoTPConfig:
        if not isinstance(d, dict):
            raise ValueError(
                f"tensor_parallel.partition_config must be a dict, got {type(d).__name__}"
            )
        unknown = sorted(set(d) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"tensor_parallel.partition_config: unknown keys {unknown}; it takes {sorted(_CONFIG_KEYS)}"
            )
        specs = [
            TPLayerSpec.from_dict(s, f"tensor_parallel.partition_config.layer_specs[{i}]")
            for i, s in enumerate(d.get("layer_specs", []))
        ]
        return cls(
            tp_size=int(d.get("tp_size", 1)),
            layer_specs=specs,
            embedding_partition_dim=int(d.get("embedding_partition_dim", 1)),
            lm_head_patterns=list(d.get("lm_head_patterns", ["lm_head", "embed_out"])),
            use_default_specs=bool(d.get("use_default_specs", True)),
            strict_mode=bool(d.get("strict_mode", False)),
        )


def merge_autotp_configs(base: AutoTPConfig, override: AutoTPConfig) -> AutoTPConfig:
    """``override``'s specs first (they win), then ``base``'s (DeepSpeed's merge)."""
    return AutoTPConfig(
        tp_size=override.tp_size if override.tp_size > 1 else base.tp_size,
        layer_specs=list(override.layer_specs) + list(base.layer_specs),
        embedding_partition_dim=override.embedding_partition_dim,
        lm_head_patterns=override.lm_head_patterns or base.lm_head_patterns,
        use_default_specs=override.use_default_specs,
        strict_mode=override.strict_mode,
    )


C, R, S = PartitionType.COLUMN, PartitionType.ROW, PartitionType.SKIP

_ATTN = [
    TPLayerSpec([r".*\.self_attn\.o_proj\.weight$"], R),
    TPLayerSpec([r".*\.self_attn\.[qkv]_proj\.weight$"], C),
]
_MLP = [
    TPLayerSpec([r".*\.mlp\.down_proj\.weight$"], R),
    TPLayerSpec([r".*\.mlp\.(up|gate)_proj\.weight$"], C),
]


def _preset_specs(name: str, model_config: Any) -> list[TPLayerSpec] | None:
    if name in ("llama", "qwen2"):
        return [*_ATTN, *_MLP]
    if name == "mixtral":
        return [
            *_ATTN,
            # transformers >= 5: the experts of a layer are one module with 3-D weights
            # gate_up_proj [experts, 2 * intermediate, hidden] and down_proj [experts, hidden,
            # intermediate]
            TPLayerSpec([r".*\.mlp\.experts\.down_proj$"], R, shape=(-1, -1, -1), partition_dim=2),
            TPLayerSpec(
                [r".*\.mlp\.experts\.gate_up_proj$"], C, shape=(-1, 2, -1), partition_dim=1
            ),
            TPLayerSpec([r".*\.mlp\.gate\.weight$"], S),
            # earlier transformers: one Linear per expert (w1/w3 gate/up, w2 down)
            TPLayerSpec([r".*\.block_sparse_moe\.experts\.\d+\.w2\.weight$"], R),
            TPLayerSpec([r".*\.block_sparse_moe\.experts\.\d+\.w[13]\.weight$"], C),
            TPLayerSpec([r".*\.block_sparse_moe\.gate\.weight$"], S),
        ]
    if name == "phi3":
        # fused [q, k, v]: DeepSpeed's preset says 3 equal parts, which holds only without
        # grouped-query attention; the sizes come from the model's config when it has one
        qkv: Any = 3
        if model_config is not None and hasattr(model_config, "num_attention_heads"):
            heads = model_config.num_attention_heads
            kv = getattr(model_config, "num_key_value_heads", None) or heads
            hd = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
            qkv = (heads * hd, kv * hd, kv * hd)
        return [
            TPLayerSpec([r".*\.self_attn\.o_proj\.weight$"], R),
            TPLayerSpec([r".*\.self_attn\.qkv_proj\.weight$"], C, shape=(qkv, -1), partition_dim=0),
            TPLayerSpec([r".*\.mlp\.down_proj\.weight$"], R),
            TPLayerSpec([r".*\.mlp\.gate_up_proj\.weight$"], C, shape=(2, -1), partition_dim=0),
        ]
    return None


PRESETS = ("llama", "qwen2", "mixtral", "phi3")


def preset_config(name: str, model_config: Any = None) -> AutoTPConfig:
    """The built-in specs of ``preset_model`` ``name`` (transformers' module names)."""
    specs = _preset_specs(str(name).lower(), model_config)
    if specs is None:
        raise ValueError(
            f"tensor_parallel.preset_model {name!r} is not a preset here; choose one of "
            f"{list(PRESETS)} or give partition_config layer_specs"
        )
    return AutoTPConfig(layer_specs=specs)


def resolve_partition_config(
    partition_config: dict[str, Any] | AutoTPConfig | None,
    preset_model: str | None,
    model_config: Any = None,
) -> AutoTPConfig:
    """DeepSpeed's precedence: the preset, then ``partition_config`` merged in front of it when
    its ``use_default_specs`` is true (otherwise it replaces the preset)."""
    config = preset_config(preset_model, model_config) if preset_model else None
    if partition_config is not None:
        custom = (
            partition_config
            if isinstance(partition_config, AutoTPConfig)
            else AutoTPConfig.from_dict(partition_config)
        )
        config = (
            merge_autotp_configs(config, custom) if config and custom.use_default_specs else custom
        )
    if config is None:
        raise ValueError(
            "AutoTP needs tensor_parallel.preset_model or tensor_parallel.partition_config to "
            f"know which layers to split; presets: {list(PRESETS)}"
        )
    return config
