"""``deepspeed.runtime.tensor_parallel.config``: ``TPTrainingConfig`` is ds-all's
``tensor_parallel`` section model."""

from __future__ import annotations

from typing import Any

from ds_all._tensor_parallel import TensorParallelSection as TPTrainingConfig
from ds_all._tensor_parallel import TPSubsection as TPConfig


def get_tensor_parallel_config(ds_config: dict[str, Any]) -> TPTrainingConfig:
    """The ``tensor_parallel`` section of a config dict (defaults when absent)."""
    return TPTrainingConfig(**ds_config.get("tensor_parallel", {}))


__all__ = ["TPConfig", "TPTrainingConfig", "get_tensor_parallel_config"]
