"""ds-accel: the accelerator abstraction every ds-* package uses to talk to a device.

>>> from ds_accel import get_accelerator
>>> get_accelerator().device_name()   # "cuda" on a GPU machine, "cpu" here
"""

from ds_accel._base import Accelerator, cpu_isa, usable_cores
from ds_accel._cpu import CPUAccelerator
from ds_accel._cuda import CUDAAccelerator
from ds_accel._mps import MPSAccelerator
from ds_accel._peak import ENV_PEAK, peak_flops
from ds_accel._registry import (
    ENTRY_POINT_GROUP,
    ENV_VAR,
    AcceleratorError,
    get_accelerator,
    get_accelerator_by_name,
    known_accelerators,
    report,
    reset_accelerator,
    set_accelerator,
)
from ds_accel._version import __version__

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_PEAK",
    "ENV_VAR",
    "Accelerator",
    "AcceleratorError",
    "CPUAccelerator",
    "CUDAAccelerator",
    "MPSAccelerator",
    "__version__",
    "cpu_isa",
    "get_accelerator",
    "get_accelerator_by_name",
    "known_accelerators",
    "peak_flops",
    "report",
    "reset_accelerator",
    "set_accelerator",
    "usable_cores",
]
