"""Layer specifications: build a layer only on the stage that owns it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class LayerSpec:
    """A layer described by its class and constructor arguments, built on demand.

    A stage builds only the specs it owns, so a model larger than one device's memory never
    exists in full on any rank.
    """

    def __init__(self, typename: Callable[..., nn.Module], *module_args: Any, **module_kwargs: Any):
        if not callable(typename):
            raise TypeError(f"LayerSpec needs a module class or factory, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    @property
    def name(self) -> str:
        return getattr(self.typename, "__name__", type(self.typename).__name__)

    def build(self) -> nn.Module:
        module = self.typename(*self.module_args, **self.module_kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"LayerSpec({self.name}) built {type(module).__name__}, not an nn.Module"
            )
        return module

    def count_parameters(self) -> int:
        """Trainable parameters, counted on the meta device so nothing is allocated."""
        with torch.device("meta"):
            module = self.build()
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def __repr__(self) -> str:
        return f"LayerSpec({self.name})"


class TiedLayerSpec(LayerSpec):
    """A layer whose weights are shared by every occurrence of the same ``key``.

    Each stage holding an occurrence builds the module once; the runtime keeps the copies equal
    (broadcast at start, gradients summed over the stages that hold it). ``forward_fn(module,
    x)`` lets an occurrence use the shared module differently, e.g. an embedding reused as
    the output projection: ``forward_fn=lambda emb, x: x @ emb.weight.t()``.
    """

    def __init__(
        self,
        key: str,
        typename: Callable[..., nn.Module],
        *module_args: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        tied_weight_attr: str | Sequence[str] = "weight",
        **module_kwargs: Any,
    ):
        super().__init__(typename, *module_args, **module_kwargs)
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(
                f"TiedLayerSpec key must be a non-empty string without '.', got {key!r}"
            )
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = (
            (tied_weight_attr,) if isinstance(tied_weight_attr, str) else tuple(tied_weight_attr)
        )

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.name})"
