"""ds-profile: DeepSpeed's flops profiler (per-module FLOPs, MACs, parameters, latency) counted
at the ATen level, with no global patching, and the autotuner driver (``ds_profile.autotune``)."""

from ds_profile._format import (
    DEFAULT_PRECISION,
    bytes_to_string,
    duration_to_string,
    flops_to_string,
    macs_to_string,
    number_to_string,
    params_to_string,
)
from ds_profile._mfu import training_flops_per_step
from ds_profile._model_profile import get_model_profile
from ds_profile._ops import attention_pairs
from ds_profile._profiler import (
    FlopsProfiler,
    ProfileNotStartedError,
    ProfilerState,
    get_module_duration,
    get_module_flops,
    get_module_macs,
)
from ds_profile._version import __version__

__all__ = [
    "DEFAULT_PRECISION",
    "FlopsProfiler",
    "ProfileNotStartedError",
    "ProfilerState",
    "__version__",
    "attention_pairs",
    "bytes_to_string",
    "duration_to_string",
    "flops_to_string",
    "get_model_profile",
    "get_module_duration",
    "get_module_flops",
    "get_module_macs",
    "macs_to_string",
    "number_to_string",
    "params_to_string",
    "training_flops_per_step",
]
