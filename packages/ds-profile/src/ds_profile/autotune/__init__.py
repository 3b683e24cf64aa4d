"""The autotuner behind ``ds-launch --autotuning tune|run``: searches ZeRO stage, offload,
micro-batch size (global batch kept) and activation checkpointing with real short trials of the
user's script, never launching what the memory estimator rules out.

Run as ``python -m ds_profile.autotune tune|run --world_size N [--launcher_args JSON] --
script.py --deepspeed_config ds_config.json ...`` (ds-launch does this for ``--autotuning``).
"""

from ds_profile.autotune._driver import AutotuneError, Result, run_best, tune
from ds_profile.autotune._estimator import ModelFacts, fits, required_bytes
from ds_profile.autotune._settings import AutotuneConfigError, AutotuneSettings, ModelInfo
from ds_profile.autotune._space import Candidate, enumerate_space, trial_config
from ds_profile.autotune._trials import Job, script_overrides
from ds_profile.autotune._tuner import Outcome, beats, fallbacks, order, prior, prune, search

__all__ = [
    "AutotuneConfigError",
    "AutotuneError",
    "AutotuneSettings",
    "Candidate",
    "Job",
    "ModelFacts",
    "ModelInfo",
    "Outcome",
    "Result",
    "beats",
    "enumerate_space",
    "fallbacks",
    "fits",
    "order",
    "prior",
    "prune",
    "required_bytes",
    "run_best",
    "script_overrides",
    "search",
    "trial_config",
    "tune",
]
