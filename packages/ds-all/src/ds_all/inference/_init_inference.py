"""``deepspeed.init_inference``: the config from a dict or JSON file and keyword arguments,
and the engine over the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ds_all._config_base import ConfigError, validate_section
from ds_all._config_file import read_config_file
from ds_all.inference.config import DeepSpeedInferenceConfig
from ds_all.inference.engine import InferenceEngine


def init_inference(
    model: nn.Module, config: str | dict[str, Any] | None = None, **kwargs: Any
) -> InferenceEngine:
    """Wrap ``model`` for inference, as DeepSpeed's ``init_inference``.

    ``config``: a dict or the path of a JSON file of DeepSpeed inference keys; keyword
    arguments are further keys (a key given both ways must have the same value).

    >>> engine = ds_all.init_inference(model, dtype=torch.bfloat16, tensor_parallel={"tp_size": 2})
    >>> logits = engine(input_ids).logits
    """
    if config is None:
        config_dict: dict[str, Any] = {}
    elif isinstance(config, (str, os.PathLike)):
        config_dict = read_config_file(Path(config))
    elif isinstance(config, dict):
        config_dict = dict(config)
    else:
        raise ConfigError(
            f"init_inference: config must be a dict or the path of a JSON file, got "
            f"{type(config).__name__}"
        )
    for key in sorted(set(config_dict) & set(kwargs)):
        if config_dict[key] != kwargs[key]:
            raise ConfigError(
                f"{key}: {config_dict[key]!r} in config but {kwargs[key]!r} as a keyword "
                "argument; give it once"
            )
    config_dict.update(kwargs)
    cfg = validate_section(DeepSpeedInferenceConfig, config_dict)
    return InferenceEngine(model, config=cfg)


def default_inference_config() -> dict[str, Any]:
    """The inference config's defaults as a dict (DeepSpeed's ``default_inference_config``)."""
    out = DeepSpeedInferenceConfig().model_dump()
    out["dtype"] = str(out["dtype"])
    return out
