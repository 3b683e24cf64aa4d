"""``deepspeed.inference``: ``init_inference``'s config and engine.

Tensor parallelism (``tensor_parallel.tp_size``) splits the model with ds-tp's AutoTP; the
fused inference kernels (``replace_with_kernel_inject``), int8 quantization and the settings
that only those read are refused with the key named.
"""

from ds_all.inference import config, engine
from ds_all.inference._init_inference import default_inference_config, init_inference
from ds_all.inference.config import (
    DeepSpeedInferenceConfig,
    DeepSpeedMoEConfig,
    DeepSpeedTPConfig,
    DtypeEnum,
    InferenceCheckpointConfig,
    MoETypeEnum,
)
from ds_all.inference.engine import InferenceEngine

__all__ = [
    "DeepSpeedInferenceConfig",
    "DeepSpeedMoEConfig",
    "DeepSpeedTPConfig",
    "DtypeEnum",
    "InferenceCheckpointConfig",
    "InferenceEngine",
    "MoETypeEnum",
    "config",
    "default_inference_config",
    "engine",
    "init_inference",
]
