"""``deepspeed.runtime.zero.stage3``: DeepSpeed's ZeRO 3 memory estimators (ds_zero's, with
DeepSpeed's formulas; ``ds_zero.memory_estimate`` counts this implementation's own model
states)."""

from ds_zero import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
    estimate_zero3_model_states_mem_needs_all_live,
)
from ds_zero import zero3_model_to_params as model_to_params

__all__ = [
    "estimate_zero3_model_states_mem_needs",
    "estimate_zero3_model_states_mem_needs_all_cold",
    "estimate_zero3_model_states_mem_needs_all_live",
    "model_to_params",
]
