"""``deepspeed.utils.OnDevice`` (also ``deepspeed.OnDevice``): build modules with their
tensors on a given device (``"meta"`` for no memory at all) and floating-point tensors in a
given dtype.

    with OnDevice(dtype=torch.float16, device="meta"):
        model = MyModel()

While active, ``torch.empty``, ``torch.zeros``, ``torch.ones`` and ``torch.full`` called
without a device create on ``device``, and floating-point results are cast to ``dtype``
(integer and boolean ones stay as they are), which is what module constructors call for their
parameters and buffers. A ``TorchFunctionMode`` does this, so nothing in torch is patched and
the context nests with others (``zero.Init``). DeepSpeed also redirects the legacy
``torch.Tensor(...)`` constructor; this does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["OnDevice"]

_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full})


class _FactoryMode(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype | None, device: torch.device | str) -> None:
        super().__init__()
        self.dtype = dtype
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES:
            if kwargs.get("device") is None:
                kwargs["device"] = self.device
            out = func(*args, **kwargs)
            if self.dtype is not None and out.is_floating_point() and out.dtype != self.dtype:
                out = out.to(self.dtype)
            return out
        return func(*args, **kwargs)


class OnDevice:
    """``OnDevice(dtype, device="meta", enabled=True)``: see the module docstring."""

    dtype: torch.dtype | None
    device: torch.device | str
    enabled: bool

    def __init__(
        self, dtype: torch.dtype | None, device: torch.device | str = "meta", enabled: bool = True
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.enabled = enabled
        self._mode: _FactoryMode | None = None

    def __enter__(self) -> OnDevice:
        if self.enabled:
            self._mode = _FactoryMode(self.dtype, self.device)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(*exc)
