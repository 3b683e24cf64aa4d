"""``deepspeed.comm``: the collectives of ds_comm under DeepSpeed's module name."""

from ds_comm import *  # noqa: F403
from ds_comm import __all__ as _comm_all

__all__ = list(_comm_all)
