"""client_state as JSON: small tensors, bytes and tuples encoded losslessly, never pickled.

Scheduler state dicts, step counters and RNG states are small; they go into the manifest as
JSON. Tensors are tagged objects with base64 data; large tensors belong in fragments instead.
"""

from __future__ import annotations

import base64
import random
import sys
from typing import Any

import torch

from ds_ckpt._dtypes import from_st, to_st
from ds_ckpt._stfile import byte_view

_TENSOR, _BYTES, _TUPLE, _ITEMS, _NDARRAY = (
    "__tensor__",
    "__bytes__",
    "__tuple__",
    "__items__",
    "__ndarray__",
)
# Above this a tensor in client_state is almost certainly model state that belongs in fragments.
_MAX_INLINE_BYTES = 64 * 1024 * 1024


def encode(obj: Any, path: str = "client_state") -> Any:
    """A JSON-ready copy of `obj`; raises naming the key path of anything unsupported."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > _MAX_INLINE_BYTES:
            raise ValueError(
                f"{path}: a {nbytes}-byte tensor is too large for client_state; save it as a "
                "fragment (ds_ckpt.Fragment.whole(name, tensor)) instead"
            )
        raw = bytes(byte_view(t)) if nbytes else b""
        return {
            _TENSOR: {
                "dtype": to_st(t.dtype, what=path),
                "shape": list(t.shape),
                "b64": base64.b64encode(raw).decode(),
            }
        }
    if isinstance(obj, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, f"{path}.{k}") for k, v in obj.items()}
        # Non-string keys (optimizer state is keyed by int) keep their type as pairs.
        return {
            _ITEMS: [
                [encode(k, f"{path}<key>"), encode(v, f"{path}[{k!r}]")] for k, v in obj.items()
            ]
        }
    if type(obj).__module__ == "numpy":
        np = sys.modules["numpy"]
        if isinstance(obj, np.ndarray):
            return {
                _NDARRAY: {
                    "dtype": obj.dtype.str,
                    "shape": list(obj.shape),
                    "b64": base64.b64encode(obj.tobytes()).decode(),
                }
            }
        if isinstance(obj, np.generic):
            return encode(obj.item(), path)
    raise TypeError(
        f"{path}: {type(obj).__qualname__} cannot be stored in client_state (JSON only: None, "
        "bool, int, float, str, list, tuple, dict, bytes, small tensors); convert it, e.g. "
        "with its state_dict()"
    )


def decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((k, v),) = obj.items()
        if k == _TENSOR:
            dtype = from_st(v["dtype"], what="client_state tensor")
            raw = bytearray(base64.b64decode(v["b64"]))
            if not raw:
                return torch.empty(v["shape"], dtype=dtype)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(v["shape"])
        if k == _BYTES:
            return base64.b64decode(v)
        if k == _TUPLE:
            return tuple(decode(x) for x in v)
        if k == _ITEMS:
            return {decode(a): decode(b) for a, b in v}
        if k == _NDARRAY:
            import numpy as np

            return (
                np.frombuffer(base64.b64decode(v["b64"]), dtype=np.dtype(v["dtype"]))
                .reshape(v["shape"])
                .copy()
            )
    return {k: decode(v) for k, v in obj.items()}


def capture_rng_state() -> dict[str, Any]:
    """The RNG states a bitwise resume needs: Python, torch CPU, CUDA per device, NumPy."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state (after the JSON round trip)."""
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(_tuples(state["numpy"]))


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
