"""``LeafModuleConfig``: DeepSpeed's ``zero_optimization.leaf_module`` section.

A ZeRO-3 leaf module is gathered as one piece: none of its sub-modules becomes a unit of its
own. Mixture-of-experts blocks need that, because each batch runs only some of their experts,
so per-expert gathers would not happen in the same order on every rank. The section names the
modules to flag (classes, by class name or fully qualified name; module names as
``named_modules()`` gives them; suffixes of those names); the engine that holds the model sets
DeepSpeed's ``_z3_leaf`` flag on them before wrapping, and ds-zero's unit selection honours the
flag. Its defaults are DeepSpeed 0.19.8's: Hugging Face's Mixtral, Qwen2-MoE and Qwen3-MoE
sparse MoE blocks, so those are leaves without any configuration.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEFAULT_LEAF_MODULE_CLASSES", "LeafModuleConfig"]

DEFAULT_LEAF_MODULE_CLASSES: tuple[str, ...] = (
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
)


class LeafModuleConfig(BaseModel):
    """The modules ZeRO-3 gathers whole (``classes``, ``names``, ``name_suffixes``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_LEAF_MODULE_CLASSES))
    names: list[str] = Field(default_factory=list)
    name_suffixes: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _as_mapping(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(
                "zero_optimization.leaf_module must be a JSON object "
                f'({{"classes": [...], "names": [...], "name_suffixes": [...]}}), got {data!r}'
            )
        return data

    @field_validator("classes", "names", "name_suffixes", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        # a single string means a one-element list, as DeepSpeed reads it
        return [value] if isinstance(value, str) else value

    @field_validator("classes", "names", "name_suffixes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))  # first occurrence kept, order kept
