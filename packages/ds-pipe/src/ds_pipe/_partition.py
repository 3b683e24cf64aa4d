"""Split a list of layers into contiguous stages: weights per layer, then a balanced cut."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ds_pipe._layers import LayerSpec, TiedLayerSpec


class PartitionError(ValueError):
    """A partition cannot be made (too few layers, bad method or boundaries)."""


def layer_weights(layers: Sequence[object], method: str) -> list[float]:
    """Per-layer cost used to balance stages.

    ``uniform``: every layer weighs 1. ``parameters``: trainable parameter count (a tied
    layer counts at its first occurrence only: later ones add no parameters). ``type:REGEX``:
    1 for layers whose class name matches REGEX (case-insensitive), else 0, i.e. balance the
    number of, say, transformer blocks.
    """
    method_l = method.lower()
    if method_l == "uniform":
        return [1.0] * len(layers)
    if method_l == "parameters":
        seen: set[str] = set()
        weights = []
        for i, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                weights.append(0.0 if layer.key in seen else _count(layer, i))
                seen.add(layer.key)
            elif isinstance(layer, LayerSpec):
                weights.append(_count(layer, i))
            elif isinstance(layer, nn.Module):
                weights.append(float(sum(p.numel() for p in layer.parameters() if p.requires_grad)))
            else:
                weights.append(0.0)
        return weights
    if method_l.startswith("type:"):
        pattern = re.compile(method[len("type:") :], re.IGNORECASE)
        weights = [1.0 if pattern.search(_layer_name(layer)) else 0.0 for layer in layers]
        if not any(weights):
            names = sorted({_layer_name(layer) for layer in layers})
            raise PartitionError(
                f"partition_method={method!r} matches no layer; layer names are {names}"
            )
        return weights
    raise PartitionError(
        f"unknown partition_method {method!r}; use 'parameters', 'uniform', 'type:REGEX' "
        "or a list of stage boundaries"
    )


def _count(spec: LayerSpec, index: int) -> float:
    """Parameters of ``spec`` built on the meta device (every rank counts every layer)."""
    try:
        return float(spec.count_parameters())
    except Exception as e:  # a constructor that reads data or needs real storage
        raise PartitionError(
            f"partition_method='parameters' counts parameters by building layers[{index}] "
            f"({spec.name}) on the meta device, which failed ({type(e).__name__}: {e}); use "
            "partition_method='uniform', 'type:REGEX' or explicit boundaries for this model"
        ) from e


def _layer_name(layer: object) -> str:
    if isinstance(layer, LayerSpec):
        return layer.name
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def balanced_boundaries(weights: Sequence[float], num_parts: int) -> list[int]:
    """Cut ``weights`` into ``num_parts`` non-empty contiguous parts minimising the heaviest.

    Returns ``num_parts + 1`` boundaries (part ``i`` is ``[b[i], b[i+1])``). Exact dynamic
    programming, O(parts * n^2): n is the number of layers (hundreds at most). Among optimal
    cuts it prefers earlier boundaries, so results are deterministic.
    """
    n = len(weights)
    if num_parts < 1:
        raise PartitionError(f"number of stages must be >= 1, got {num_parts}")
    if n < num_parts:
        raise PartitionError(
            f"cannot split {n} layers into {num_parts} stages: every stage needs a layer; "
            "use fewer stages (or virtual stages) or more layers"
        )
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[k][i]: minimal heaviest part when the first i layers form k parts.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    i = n
    for k in range(num_parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def partition(layers: Sequence[object], num_parts: int, method: str | Sequence[int]) -> list[int]:
    """Stage boundaries for ``layers`` by ``method`` (a name, or explicit boundaries)."""
    if not isinstance(method, str):
        bounds = [int(b) for b in method]
        ok = (
            len(bounds) == num_parts + 1
            and bounds[0] == 0
            and bounds[-1] == len(layers)
            and all(a < b for a, b in zip(bounds, bounds[1:]))
        )
        if not ok:
            raise PartitionError(
                f"explicit partition {bounds} must be {num_parts + 1} increasing boundaries from 0 "
                f"to {len(layers)} (one non-empty range per stage)"
            )
        return bounds
    if method.lower() == "uniform":
        return uniform_boundaries(len(layers), num_parts)
    return balanced_boundaries(layer_weights(layers, method), num_parts)


def uniform_boundaries(num_layers: int, num_parts: int) -> list[int]:
    """``num_layers // num_parts`` layers per stage, the remainder one each to the first stages.

    DeepSpeed's ``partition_uniform``: a model partitioned ``"uniform"`` here puts every layer
    on the same stage as under DeepSpeed (a balanced cut of equal weights is also optimal, but
    would give the spare layers to the last stages instead).
    """
    if num_parts < 1:
        raise PartitionError(f"number of stages must be >= 1, got {num_parts}")
    if num_layers < num_parts:
        raise PartitionError(
            f"cannot split {num_layers} layers into {num_parts} stages: every stage needs a "
            "layer; use fewer stages (or virtual stages) or more layers"
        )
    size, extra = divmod(num_layers, num_parts)
    return [i * size + min(i, extra) for i in range(num_parts + 1)]
