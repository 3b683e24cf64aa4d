"""``deepspeed.zero`` names: ``Init`` and ``GatheredParameters`` come from ds_zero."""

from ds_zero import GatheredParameters, Init

__all__ = ["GatheredParameters", "Init"]
