"""Peak dense FLOP/s per device model and dtype, the denominator of model FLOPs utilization.

Numbers are the vendors' dense (no structured sparsity) tensor-core peaks. A device not in the
table has no known peak (None): MFU is then left out rather than guessed. ``DS_PEAK_FLOPS``
(FLOP/s per device, e.g. ``989e12``) overrides the table for any device, including CPUs.
"""

from __future__ import annotations

import math
import os
from types import MappingProxyType

import torch

ENV_PEAK = "DS_PEAK_FLOPS"

_T = 1e12
# (substring of the device name, most specific first) -> {dtype key: FLOP/s}
_TABLE = MappingProxyType({
    "H100 PCIE": {"bf16": 756 * _T, "fp16": 756 * _T, "tf32": 378 * _T, "fp32": 51 * _T},
    "H100": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "H200": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "GH200": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "B200": {"bf16": 2250 * _T, "fp16": 2250 * _T, "tf32": 1100 * _T, "fp32": 75 * _T},
    "A100": {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
    "L40S": {"bf16": 362 * _T, "fp16": 362 * _T, "tf32": 183 * _T, "fp32": 91.6 * _T},
    "L4": {"bf16": 121 * _T, "fp16": 121 * _T, "tf32": 60 * _T, "fp32": 30.3 * _T},
    "A10": {"bf16": 125 * _T, "fp16": 125 * _T, "tf32": 62.5 * _T, "fp32": 31.2 * _T},
    "V100": {"fp16": 125 * _T, "fp32": 15.7 * _T},
    "MI300X": {"bf16": 1307 * _T, "fp16": 1307 * _T, "tf32": 654 * _T, "fp32": 163 * _T},
})  # fmt: skip

_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _dtype_key(dtype: torch.dtype) -> str | None:
    key = _KEYS.get(dtype)
    # fp32 matmuls run on tensor cores as TF32 when torch is allowed to ("high"/"medium")
    if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return key


def peak_flops(dtype: torch.dtype, device_name: str | None = None) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in ``dtype``, or None when unknown.

    ``device_name`` is the product name ("NVIDIA H100 80GB HBM3"); by default the current CUDA
    device's, and None (unknown) on CPU or other accelerators unless ``DS_PEAK_FLOPS`` is set.
    """
    override = os.environ.get(ENV_PEAK)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{ENV_PEAK}={override!r}: expected FLOP/s per device above 0, e.g. 989e12"
            )
        return value
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name(torch.cuda.current_device())
    name = device_name.upper()
    key = _dtype_key(dtype)
    for model, peaks in _TABLE.items():
        if model in name:
            return peaks.get(key) if key else None
    return None
