"""What the three 1-bit optimizers share: the transport, exact and compressed averaging.

Contract with the training loop (and with engines such as ds_all's): these optimizers take
**local, un-averaged gradients** and do all data-parallel communication themselves, exact
(full-precision mean) in their warmup/variance steps and 1-bit compressed otherwise. An engine
using them must therefore skip its own gradient all-reduce. Where something else has already
averaged the gradients, pass ``allreduce_gradients=False`` to skip the exact averaging (the
compressed stages still communicate, since that is what keeps replicas in sync).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ds_comm._compressed import ErrorFeedback, compressed_allreduce, make_compressed_comm
from ds_comm._logger import CommsLogger


class OneBitOptimizerBase(torch.optim.Optimizer):
    """Shared plumbing; subclasses implement ``step``."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        cuda_aware: bool,
        comm_backend_name: str | None,
        group: Any,
        allreduce_gradients: bool,
        logger: CommsLogger | None,
    ) -> None:
        super().__init__(params, defaults)
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if not p.is_floating_point():
                    raise TypeError(
                        f"{type(self).__name__}: param group {gi} has a {p.dtype} parameter; "
                        f"only floating parameters can be optimised"
                    )
        self.cuda_aware: bool = cuda_aware
        self.comm_backend_name: str | None = comm_backend_name
        self.allreduce_gradients: bool = allreduce_gradients
        self._group = group
        self._logger = logger
        self._comm: Any = None
        # One error-feedback state per (param group, purpose): errors are tied to a layout.
        self._feedback: dict[tuple[int, str], ErrorFeedback] = {}

    # ------------------------------------------------------------------ communication
    @property
    def comm(self) -> Any:
        """The transport, created on first use so the optimizer can be built before
        torch.distributed is initialised."""
        if self._comm is None:
            name = self.comm_backend_name or "torch"
            self._comm = make_compressed_comm(name, self._group, self.cuda_aware, self._logger)
        return self._comm

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def _exact_mean(self, tensors: list[torch.Tensor]) -> None:
        if self.allreduce_gradients and tensors and self.world_size > 1:
            self.comm.all_reduce_mean(tensors)

    def _compressed_mean(self, tensors: list[torch.Tensor], group_index: int, purpose: str):
        """1-bit mean of ``tensors`` (in place) as one flat buffer with its own error state."""
        if self.world_size == 1 or not tensors:
            return
        ef = self._feedback.setdefault((group_index, purpose), ErrorFeedback())
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        compressed_allreduce(flat, ef, comm=self.comm)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _trainable(group: dict[str, Any]) -> list[torch.Tensor]:
        # Every trainable parameter takes part, with a zero gradient when it has none, so the
        # flat layout (and the error buffers bound to it) is the same on every rank and step.
        return [p for p in group["params"] if p.requires_grad]

    @staticmethod
    def _grads(params: list[torch.Tensor], clone: bool) -> list[torch.Tensor]:
        out = []
        for p in params:
            if p.grad is None:
                out.append(torch.zeros_like(p))
            elif p.grad.is_sparse:
                raise RuntimeError("1-bit optimizers do not support sparse gradients")
            else:
                out.append(p.grad.detach().clone() if clone else p.grad.detach())
        return out

    @staticmethod
    def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
        if max_norm > 0:
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            coef = max_norm / (total + 1e-6)
            if coef < 1:
                for g in grads:
                    g.mul_(coef)

    def _denom(self, v: torch.Tensor, bc2: float, eps: float, eps_inside_sqrt: bool):
        if eps_inside_sqrt:
            return (v / bc2).add_(eps).sqrt_()
        return (v / bc2).sqrt_().add_(eps)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Error buffers are not saved: they are reconstructed from zero, as DeepSpeed does.
        self._feedback.clear()
