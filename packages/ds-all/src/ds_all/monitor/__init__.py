"""``deepspeed.monitor``: training monitors under DeepSpeed's path (ds_all's CSV and
TensorBoard writers, configured by DeepSpeed's monitor config classes)."""

from ds_all.monitor import config, monitor

__all__ = ["config", "monitor"]
