"""ds-all: the DeepSpeed-compatible engine over every ds-* package.

import ds_all as deepspeed
engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config="ds.json")
loss = engine(batch); engine.backward(loss); engine.step()
"""

from ds_all import checkpointing
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
from ds_all._version import __version__

# DeepSpeed's module paths that scripts import from
from ds_zero import GatheredParameters, Init  # noqa: E402  (re-exported as deepspeed.zero.*)

__all__ = [
    "ConfigError",
    "DeepSpeedConfig",
    "DeepSpeedEngine",
    "GatheredParameters",
    "Init",
    "LRRangeTest",
    "OneCycle",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "__version__",
    "add_config_arguments",
    "build_scheduler",
    "checkpointing",
    "init_distributed",
    "initialize",
]
