"""The dtype names of the safetensors format and their torch equivalents.

The manifest and the fragment files both use safetensors' names, so a file written here opens
with any safetensors reader and the manifest stays readable without torch.
"""

from __future__ import annotations

import torch

_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):  # newer dtypes: present from torch 2.3 on
        _TO_ST[getattr(torch, _name)] = _st

_FROM_ST: dict[str, torch.dtype] = {v: k for k, v in _TO_ST.items()}

# Accepted spellings on the command line (`--dtype bf16`).
CLI_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
}


def to_st(dtype: torch.dtype, *, what: str = "tensor") -> str:
    """Safetensors name of `dtype`; raises naming `what` when the format cannot hold it."""
    try:
        return _TO_ST[dtype]
    except KeyError:
        raise TypeError(
            f"{what}: dtype {dtype} cannot be stored in a safetensors checkpoint; "
            f"convert it to one of {sorted(str(d) for d in _TO_ST)} first"
        ) from None


def from_st(name: str, *, what: str = "tensor") -> torch.dtype:
    """Torch dtype for a safetensors dtype name; raises naming `what` for an unknown one."""
    try:
        return _FROM_ST[name]
    except KeyError:
        raise ValueError(
            f"{what}: unknown dtype {name!r} (known: {sorted(_FROM_ST)}); the file was written "
            f"by a newer or foreign writer"
        ) from None


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
