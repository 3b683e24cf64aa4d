"""``deepspeed.runtime.tensor_parallel``: the AutoTP training config."""

from ds_all.runtime.tensor_parallel.config import TPTrainingConfig, get_tensor_parallel_config

__all__ = ["TPTrainingConfig", "get_tensor_parallel_config"]
