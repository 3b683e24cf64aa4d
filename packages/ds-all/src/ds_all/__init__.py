"""ds-all: the DeepSpeed-compatible engine over every ds-* package.

import ds_all as deepspeed
engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config="ds.json")
loss = engine(batch); engine.backward(loss); engine.step()
"""

# DeepSpeed's module tree (ds_all.runtime, ds_all.utils, ...): each module re-exports the
# package that implements it. comm and zero are imported here, as DeepSpeed's __init__ does,
# because clients call deepspeed.comm.* and deepspeed.zero.* after a bare `import deepspeed`.
from ds_all import (  # noqa: E402
    accelerator,
    checkpointing,
    comm,
    inference,
    ops,
    pipe,
    runtime,
    utils,
    zero,
)
from ds_all._config import DeepSpeedConfig
from ds_all._config_base import ConfigError
from ds_all._engine import DeepSpeedEngine
from ds_all._initialize import add_config_arguments, init_distributed, initialize
from ds_all._schedulers import (
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)
from ds_all._tensor_parallel import tp_model_init
from ds_all._version import __version__
from ds_all.accelerator import get_accelerator
from ds_all.inference import (
    DeepSpeedInferenceConfig,
    InferenceEngine,
    default_inference_config,
    init_inference,
)
from ds_all.pipe import PipelineModule
from ds_all.runtime.base_optimizer import DeepSpeedOptimizer
from ds_all.runtime.compiler import is_compile_supported
from ds_all.runtime.config import DeepSpeedConfigError
from ds_all.runtime.dataloader import DeepSpeedDataLoader
from ds_all.runtime.pipe.engine import PipelineEngine
from ds_all.utils import OnDevice
from ds_all.utils.logging import log_dist, logger
from ds_all.zero import GatheredParameters, Init  # noqa: E402

__all__ = [
    "logger",
    "log_dist",
    "PipelineEngine",
    "DeepSpeedOptimizer",
    "DeepSpeedDataLoader",
    "DeepSpeedConfigError",
    "ConfigError",
    "DeepSpeedConfig",
    "DeepSpeedEngine",
    "DeepSpeedInferenceConfig",
    "GatheredParameters",
    "InferenceEngine",
    "Init",
    "LRRangeTest",
    "OnDevice",
    "OneCycle",
    "PipelineModule",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "__version__",
    "accelerator",
    "add_config_arguments",
    "build_scheduler",
    "checkpointing",
    "comm",
    "default_inference_config",
    "get_accelerator",
    "inference",
    "init_distributed",
    "init_inference",
    "initialize",
    "is_compile_supported",
    "ops",
    "pipe",
    "runtime",
    "tp_model_init",
    "utils",
    "zero",
]
