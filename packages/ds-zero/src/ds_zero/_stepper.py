"""Optimizer-state placement protocol: who holds the fp32 master partitions and steps them.

ds-zero owns partitioning and communication; a ``PartitionStepper`` owns the fp32 master
partitions' optimizer state and the update. The default wraps any ``torch.optim.Optimizer`` over
on-device partitions; ds-offload implements the same protocol for CPU/NVMe placement without
either package importing the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class MasterPartition:
    """One bucket's fp32 master partition on this rank.

    index: stable id used in every later call.
    group_index: the optimizer param group (hyper-parameters) it belongs to.
    master: fp32 1-D tensor initialised from the model; the stepper may move it (keep the object
        updated in place if ``masters_on_device``: stage 3 all-gathers parameters from it).
    param_shard: compute-dtype 1-D destination for the updated values after each step, or None
        when ZeRO reads the master directly (the master is the parameter storage, or stage 3
        gathers from the on-device master).
    param_writer: when set (``param_shard`` is then None), the stepper hands the updated fp32
        master values (1-D, any device) to it after each step and in ``state_loaded``, instead
        of writing a ``param_shard``: the compute-dtype shard lives in a ``ParamShardStore``.
        It reads the tensor before returning.
    order: position of the partition's first parameter in ``model.parameters()`` (DeepSpeed's
        parameter order: offload ``ratio`` keeps the first part of the model on the device);
        -1 where unknown.
    grad_dtype: the dtype in which ZeRO can hand over this partition's final gradient with
        exactly the values of its fp32 gradient: the 16-bit compute dtype where the gradient
        is the autograd result itself (one rank, one micro-step per step, a stepper that takes
        the unscale/clip factor in ``step``), float32 otherwise. ZeRO hands it over in that
        dtype only to a stepper whose ``grad_dtype(index)`` answers it.
    """

    index: int
    group_index: int
    master: torch.Tensor
    param_shard: torch.Tensor | None
    param_writer: Callable[[torch.Tensor], None] | None = None
    order: int = -1
    grad_dtype: torch.dtype = torch.float32


@runtime_checkable
class PartitionStepper(Protocol):
    """What ZeRO needs from whoever holds the optimizer state.

    Call order: ``setup`` once; then per optimizer step, ``grad_ready`` for each partition as
    its reduced fp32 gradient is final (already unscaled and clipped only by the time ``step``
    is called), then ``step`` with every gradient (same order as the partitions). ``step`` must
    write updated values into ``param_shard`` where it is not None (or hand them to
    ``param_writer`` where that is set). ``group_options`` are the
    optimizer's live param-group dicts: ignore their ``"params"`` and read hyper-parameters (lr)
    at every step, so LR schedulers reach the stepper.

    Optional extension of a stepper with ``accepts_grad_scale`` (read with ``getattr``):
    ``holds_grad(index) -> bool`` after ``grad_ready(index, grad, early_copy=True)``: True when
    the stepper has its own copy of that gradient (or a reference keeping it alive), so ZeRO
    drops its reference at once (an offloaded step then keeps no reduced gradient on the
    device), takes the partition's norm for clipping then, and passes None for it to ``step``.
    ``grad_dtype(index) -> torch.dtype`` (read after ``setup``): the dtype the stepper keeps
    that partition's gradient in; where it equals ``MasterPartition.grad_dtype`` (a 16-bit
    dtype) ZeRO hands the gradient over in it (fp32 whenever a step accumulates after all), and
    the stepper must accept gradients of either dtype; a gradient passed to ``step`` with a
    factor must have the factor applied in fp32 on the widened gradient.
    """

    masters_on_device: bool
    """True when ``partition.master`` stays a live on-device tensor (stage 3 then all-gathers
    parameters from it and keeps no separate compute-dtype shard). False: after ``setup`` the
    stepper owns the fp32 masters (it may free ``partition.master``'s memory where
    ``param_shard`` is not None); ZeRO then reads and writes them only through
    ``state_tensors`` (+ ``state_loaded``), and keeps a compute-dtype shard for stage 3."""

    def setup(
        self, partitions: Sequence[MasterPartition], group_options: Sequence[dict[str, Any]]
    ) -> None: ...

    def grad_ready(self, index: int, grad: torch.Tensor) -> None: ...

    def step(self, grads: Sequence[torch.Tensor]) -> None: ...

    def state_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Live tensors of a partition: ``"master"`` plus each optimizer state with the master's
        numel (e.g. ``"exp_avg"``), and scalar states (e.g. ``"step"``) as 1-element tensors.
        Filling them in place and then calling ``state_loaded`` loads a checkpoint."""
        ...

    def state_loaded(self) -> None: ...


class TorchOptimizerStepper:
    """Default stepper: points a ``torch.optim.Optimizer``'s param groups at the on-device fp32
    master partitions, so any torch optimizer (and ds-kernels' fused ones) works unchanged and
    an LR scheduler built on that optimizer keeps working."""

    masters_on_device = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.partitions: list[MasterPartition] = []

    def setup(
        self, partitions: Sequence[MasterPartition], group_options: Sequence[dict[str, Any]]
    ) -> None:
        del group_options  # the optimizer already holds its groups' hyper-parameters
        self.partitions = list(partitions)
        groups = self.optimizer.param_groups
        for g in groups:
            g["params"] = []
        for part in self.partitions:
            groups[part.group_index]["params"].append(part.master)
        self.optimizer.state.clear()

    def grad_ready(self, index: int, grad: torch.Tensor) -> None:
        del index, grad

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        for part, grad in zip(self.partitions, grads):
            part.master.grad = grad
        self.optimizer.step()
        dst, src = [], []
        for part in self.partitions:
            part.master.grad = None
            if part.param_writer is not None:
                part.param_writer(part.master)
            elif part.param_shard is not None:
                dst.append(part.param_shard)
                src.append(part.master)
        for d, s in zip(dst, src):
            d.copy_(s)

    @torch.no_grad()
    def materialize_state(self) -> None:
        """Create lazily-initialised optimizer state (so a checkpoint can be loaded before the
        first step): one step with zero gradients and learning rate 0, then step counters reset.
        Exact for optimizers whose state starts from zero (Adam/AdamW/SGD momentum/Adagrad...)."""
        if all(part.master in self.optimizer.state for part in self.partitions):
            return
        saved = [g.get("lr") for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            if "lr" in g:
                g["lr"] = 0.0 if not torch.is_tensor(g["lr"]) else torch.zeros_like(g["lr"])
        for part in self.partitions:
            part.master.grad = torch.zeros_like(part.master)
        self.optimizer.step()
        for part in self.partitions:
            part.master.grad = None
            state = self.optimizer.state.get(part.master, {})
            if "step" in state:
                state["step"] = (
                    torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
                )
        for g, lr in zip(self.optimizer.param_groups, saved):
            if lr is not None:
                g["lr"] = lr

    def state_tensors(self, index: int) -> dict[str, torch.Tensor]:
        self.materialize_state()
        part = self.partitions[index]
        out: dict[str, torch.Tensor] = {"master": part.master}
        for key, value in self.optimizer.state.get(part.master, {}).items():
            if torch.is_tensor(value) and value.numel() == part.master.numel():
                out[key] = value
            elif torch.is_tensor(value) and value.numel() == 1:
                out[key] = value.reshape(1)
            elif isinstance(value, (int, float)):
                # Python scalar state: wrap so it can be filled in place, written back on load
                tensor = torch.tensor([float(value)])
                self.optimizer.state[part.master][key] = tensor
                out[key] = tensor
        return out

    @torch.no_grad()
    def state_loaded(self) -> None:
        for part in self.partitions:
            if part.param_writer is not None:
                part.param_writer(part.master)
            elif part.param_shard is not None:
                part.param_shard.copy_(part.master)
