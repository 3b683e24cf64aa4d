"""``deepspeed.runtime.fp16``: DeepSpeed's loss-scaler module (``loss_scaler``)."""

from ds_all.runtime.fp16 import loss_scaler

__all__ = ["loss_scaler"]
