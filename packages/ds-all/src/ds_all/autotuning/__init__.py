"""DeepSpeed's ``deepspeed.autotuning``: the ``Autotuner`` its launcher drives, over the
autotuner of ds-profile (the search, the memory estimator, the trials)."""

from ds_all.autotuning.autotuner import Autotuner

__all__ = ["Autotuner"]
