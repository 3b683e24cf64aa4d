"""Describe what crosses a stage boundary: a tensor or a tuple of tensors of any dtype.

The description is encoded as a fixed-size int64 tensor so it travels as one small message;
the receiver allocates its buffers from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)
META_LEN = 256
"""int64 words per metadata message: enough for e.g. 16 tensors of rank 8."""


class StageIOError(TypeError):
    """A stage produced something that cannot be sent to the next stage."""


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    """True when the receiver must track and send back a gradient (floating, part of a graph)."""


@dataclass(frozen=True)
class PayloadMeta:
    """What one stage sends to the next for one micro-batch."""

    is_tuple: bool
    tensors: tuple[TensorMeta, ...]

    @staticmethod
    def flatten(value: Any, where: str) -> tuple[bool, list[torch.Tensor]]:
        if isinstance(value, torch.Tensor):
            return False, [value]
        if isinstance(value, (tuple, list)) and value:
            bad = [type(v).__name__ for v in value if not isinstance(v, torch.Tensor)]
            if not bad:
                return True, list(value)
            raise StageIOError(
                f"{where} returned a tuple holding {bad}; only tensors can cross stage "
                "boundaries (pass constants through the layer's constructor instead)"
            )
        raise StageIOError(
            f"{where} returned {type(value).__name__}; a stage must return a tensor or a "
            "non-empty tuple of tensors"
        )

    @classmethod
    def of(cls, value: Any, where: str) -> PayloadMeta:
        is_tuple, tensors = cls.flatten(value, where)
        metas = []
        for t in tensors:
            if t.dtype not in _DTYPES:
                raise StageIOError(f"{where}: dtype {t.dtype} cannot be sent between stages")
            metas.append(
                TensorMeta(tuple(t.shape), t.dtype, bool(t.requires_grad and t.is_floating_point()))
            )
        return cls(is_tuple, tuple(metas))

    def grad_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.tensors) if m.requires_grad]

    def pack(self, tensors: list[torch.Tensor]) -> Any:
        return tuple(tensors) if self.is_tuple else tensors[0]

    def encode(self) -> torch.Tensor:
        words = [int(self.is_tuple), len(self.tensors)]
        for m in self.tensors:
            words += [_DTYPES.index(m.dtype), int(m.requires_grad), len(m.shape), *m.shape]
        if len(words) > META_LEN:
            raise StageIOError(
                f"stage output description needs {len(words)} words (> {META_LEN}): too many "
                "tensors or dimensions between stages; concatenate tensors first"
            )
        out = torch.zeros(META_LEN, dtype=torch.int64)
        out[: len(words)] = torch.tensor(words, dtype=torch.int64)
        return out

    @classmethod
    def decode(cls, encoded: torch.Tensor) -> PayloadMeta:
        w = encoded.tolist()
        is_tuple, n = bool(w[0]), w[1]
        pos, metas = 2, []
        for _ in range(n):
            dtype, rg, ndim = _DTYPES[w[pos]], bool(w[pos + 1]), w[pos + 2]
            shape = tuple(w[pos + 3 : pos + 3 + ndim])
            metas.append(TensorMeta(shape, dtype, rg))
            pos += 3 + ndim
        return cls(is_tuple, tuple(metas))

    def empty(self, device: torch.device) -> list[torch.Tensor]:
        return [torch.empty(m.shape, dtype=m.dtype, device=device) for m in self.tensors]
