"""Execute a schedule: forward/backward of local stages, batched P2P, gradient reduction."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import ds_comm
from ds_pipe import _comm
from ds_pipe._grid import PipelineGrid
from ds_pipe._meta import META_LEN, PayloadMeta, StageIOError
from ds_pipe._module import PipelineModule
from ds_pipe._reduce import all_reduce_bucketed, clip_grad_norm
from ds_pipe._schedule_ir import Action, ActionKind, Schedule
from ds_pipe._schedules import build_schedule, forward_only
from ds_pipe._simulate import simulate
from ds_pipe._validate import validate

Message = tuple[str, int, int]  # (channel "act"/"grad", producer stage, micro-batch)


class StepPhase(enum.Enum):
    """Where the runtime is; says what memory a step holds."""

    IDLE = "idle"
    """Between steps: no activations, no communication buffers."""
    RUNNING = "running"
    """Inside a step: activations of in-flight micro-batches and posted P2P buffers are live."""


class _Transfer:
    """One posted batch of P2P operations; keeps send buffers alive until it completes."""

    def __init__(self, works: list, keep: list[torch.Tensor]) -> None:
        self.works = works
        self.keep = keep
        self.done = not works

    def wait(self) -> None:
        if not self.done:
            for w in self.works:
                w.wait()
            self.done = True
            self.keep = []


@dataclass
class _StepState:
    """Everything one step holds; dropped as a whole when the step ends."""

    data_iter: Iterator[Any] | None
    train: bool
    data: list[Any] = field(default_factory=list)
    inbox: dict[Message, tuple[list[torch.Tensor], _Transfer | None]] = field(default_factory=dict)
    outbox: dict[Message, list[torch.Tensor]] = field(default_factory=dict)
    saved: dict[tuple[int, int], tuple[list[torch.Tensor], Any]] = field(default_factory=dict)
    out_meta: dict[int, PayloadMeta] = field(default_factory=dict)
    in_meta: dict[int, PayloadMeta] = field(default_factory=dict)
    meta_sends: list[_Transfer] = field(default_factory=list)
    transfers: list[_Transfer] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    announced: set[int] = field(default_factory=set)
    """Stages whose output metadata this rank already sent in this step."""


class PipelineRuntime:
    """Runs a ``PipelineModule`` with a schedule: ``train_batch`` and ``eval_batch``.

    Args:
        module: this rank's ``PipelineModule``.
        optimizer: optional; stepped (then gradients zeroed) at the end of ``train_batch``.
            Leave it ``None`` when something else (e.g. ds-zero stage 1 driven by ds-all)
            reduces and steps: see ``reduce_data_parallel``.
        micro_batches: micro-batches per step (gradient accumulation steps).
        schedule: ``"1f1b"`` (default), ``"gpipe"`` or ``"interleaved_1f1b"`` (needs the module
            built with ``num_chunks > 1``); or a ready ``Schedule``.
        max_grad_norm: clip by the global norm over the pipeline (None: no clipping).
        reduce_data_parallel: all-reduce gradients over the data-parallel group after the
            last backward (bucketed). Turn off when a ZeRO optimizer reduces them itself.
        reduce_bucket_mb: bucket size of that all-reduce.
        device: where stage inputs and P2P buffers live; default: the module's parameters'
            device (the current CUDA device under NCCL).
        action_hook: ``hook(action)`` returns a context manager entered around every action
            this rank executes (profiling, e.g. CUDA events around forwards and backwards).
    """

    def __init__(
        self,
        module: PipelineModule,
        optimizer: torch.optim.Optimizer | None = None,
        micro_batches: int = 1,
        schedule: str | Schedule = "1f1b",
        grid: PipelineGrid | None = None,
        max_grad_norm: float | None = None,
        reduce_data_parallel: bool = True,
        reduce_bucket_mb: float = 25.0,
        device: torch.device | str | None = None,
        action_hook: Callable[[Action], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        if not isinstance(module, PipelineModule):
            raise TypeError(f"PipelineRuntime needs a PipelineModule, got {type(module).__name__}")
        ds_comm.require_initialized_if_launched("ds_pipe.PipelineRuntime")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.module = module
        self.optimizer = optimizer
        self.micro_batches = micro_batches
        self.grid = grid or PipelineGrid(module.topology)
        if self.grid.stage_id != module.stage_id:
            raise ValueError(
                f"module was built for stage {module.stage_id} but this rank is stage "
                f"{self.grid.stage_id} of {module.topology}"
            )
        self.max_grad_norm = max_grad_norm
        self.reduce_data_parallel = reduce_data_parallel
        self.reduce_bucket_bytes = int(reduce_bucket_mb * 2**20)
        self.device = torch.device(device) if device is not None else self._default_device()
        self.p = module.num_stages
        self.num_virtual = module.num_stages * module.num_chunks
        self.train_schedule = self._check(self._make_train_schedule(schedule))
        self.eval_schedule = self._check(forward_only(self.p, micro_batches, module.num_chunks))
        self.action_hook = action_hook
        self.last_grad_norm: torch.Tensor | None = None
        self.phase = StepPhase.IDLE
        self.tie_groups = self._make_tie_groups()
        self._sync_initial_weights()

    # -- setup --------------------------------------------------------------------------------

    def _default_device(self) -> torch.device:
        """The parameters' device; without parameters, the accelerator's current device."""
        for p in self.module.parameters():
            if _comm.backend() == "nccl" and p.device.type == "cpu":
                raise ValueError(
                    "the process group uses NCCL but this stage's parameters are on the CPU; "
                    "move the module to the GPU (module.to('cuda')) before PipelineRuntime"
                )
            return p.device
        from ds_accel import get_accelerator  # imported here: only stages without parameters

        accel = get_accelerator()
        if _comm.backend() in ("gloo", "none"):
            return torch.device("cpu")
        return torch.device(accel.current_device_name())

    def _make_train_schedule(self, schedule: str | Schedule) -> Schedule:
        if isinstance(schedule, Schedule):
            s = schedule
        else:
            s = build_schedule(schedule, self.p, self.micro_batches, self.module.num_chunks)
        if (s.num_ranks, s.num_chunks, s.num_micro_batches) != (
            self.p,
            self.module.num_chunks,
            self.micro_batches,
        ):
            raise ValueError(
                f"schedule {s.name!r} is for {s.num_ranks} ranks x {s.num_chunks} chunks x "
                f"{s.num_micro_batches} micro-batches; the module/runtime has {self.p} x "
                f"{self.module.num_chunks} x {self.micro_batches}"
            )
        return s

    @staticmethod
    def _check(s: Schedule) -> Schedule:
        validate(s)
        s.meta["simulated"] = simulate(s)  # raises DeadlockError before any rank can hang
        return s

    def _make_tie_groups(self) -> dict[str, tuple[Any, list[int]]]:
        """For each tie key this rank holds: the group of ranks (in this replica) holding it."""
        topo = self.grid.topology
        coord = topo.get_coord(self.grid.global_rank)._asdict()
        groups: dict[str, tuple[Any, list[int]]] = {}
        for key in sorted(self.module.tied):
            pipes = sorted({s % self.p for s in self.module.tied_stages[key]})
            ranks = [topo.get_rank(**{**coord, "pipe": pc}) for pc in pipes]
            groups[key] = (_comm.new_group(ranks) if len(ranks) > 1 else None, ranks)
        return groups

    @torch.no_grad()
    def _sync_initial_weights(self) -> None:
        """Tied copies start equal (lowest stage wins); replicas start equal (replica 0 wins)."""
        if self.grid.pipe_group is not None and self.p > 1:
            # NCCL requires every member in a group's first call; afterwards batched P2P may
            # involve only a pair of its ranks.
            _comm.all_reduce(torch.zeros(1, device=self.device), self.grid.pipe_group)
        for key, (group, ranks) in self.tie_groups.items():
            if group is not None:
                for p in self.module.tied[key].parameters():
                    _comm.broadcast(p.data, src=ranks[0], group=group)
        if self.grid.data_parallel_size > 1:
            src = self.grid.data_parallel_ranks[0]
            for p in self.module.parameters():
                _comm.broadcast(p.data, src=src, group=self.grid.data_parallel_group)

    # -- public API -----------------------------------------------------------------------------

    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` micro-batches; returns the mean loss.

        ``data_iter`` yields ``(inputs, labels)`` per micro-batch and is read on the ranks of
        the first stage (inputs) and of the last stage (labels): give those ranks iterators
        over the same data. Other ranks may pass None. Every rank returns the loss.
        """
        self.module.train()
        state = _StepState(data_iter, train=True)
        self._run(self.train_schedule, state)
        return self._mean_loss(state)

    @torch.no_grad()
    def eval_batch(
        self, data_iter: Iterator[Any] | None = None, return_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[Any]]:
        """Forward ``micro_batches`` micro-batches; returns the mean loss (and, on the last
        stage, the per-micro-batch outputs when ``return_outputs``)."""
        was_training = self.module.training
        self.module.eval()
        try:
            state = _StepState(data_iter, train=False)
            self._run(self.eval_schedule, state)
            loss = self._mean_loss(state)
        finally:
            self.module.train(was_training)
        return (loss, state.outputs) if return_outputs else loss

    @property
    def simulated(self):
        """Simulation of the training schedule (unit costs): bubble, peak activations."""
        return self.train_schedule.meta["simulated"]

    # -- execution --------------------------------------------------------------------------

    def _run(self, schedule: Schedule, state: _StepState) -> None:
        self.phase = StepPhase.RUNNING
        try:
            for batch in schedule.batches(self.grid.stage_id):
                if self.action_hook is None:
                    self._execute(batch, state)
                    continue
                # Wait for a compute's input outside the hook, so a profiler timing the
                # compute does not count the wait for the previous stage.
                self._await_input(batch[0], state)
                with self.action_hook(batch[0]):
                    self._execute(batch, state)
            self._wait_all(state)
        finally:
            self.phase = StepPhase.IDLE

    def _execute(self, batch: list[Action], state: _StepState) -> None:
        a = batch[0]
        if a.kind.is_comm:
            self._post(batch, state)
        elif a.kind is ActionKind.FORWARD:
            self._forward(a, state)
        elif a.kind is ActionKind.BACKWARD:
            self._backward(a, state)
        elif a.kind is ActionKind.REDUCE_GRADS:
            self._wait_all(state)
            self._reduce_gradients()
        elif a.kind is ActionKind.OPTIMIZER_STEP:
            self._optimizer_step()

    def _wait_all(self, state: _StepState) -> None:
        for t in state.transfers:
            t.wait()
        for t in state.meta_sends:
            t.wait()
        state.transfers.clear()
        state.meta_sends.clear()

    def _micro_batch(self, state: _StepState, mb: int) -> Any:
        if state.data_iter is None:
            raise ValueError(
                f"rank {self.grid.global_rank} holds the first or last stage and needs data: "
                "pass data_iter (yielding (inputs, labels) per micro-batch)"
            )
        while len(state.data) <= mb:
            item = next(state.data_iter)
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(
                    "data_iter must yield (inputs, labels) pairs, one per micro-batch; got "
                    f"{type(item).__name__}"
                )
            state.data.append(_to_device(item, self.device))
        return state.data[mb]

    def _await_input(self, a: Action, state: _StepState) -> None:
        if a.kind is ActionKind.FORWARD:
            msg: Message = ("act", a.stage - 1, a.micro_batch)
        elif a.kind is ActionKind.BACKWARD:
            msg = ("grad", a.stage + 1, a.micro_batch)
        else:
            return
        entry = state.inbox.get(msg)
        if entry is not None and entry[1] is not None:
            entry[1].wait()

    def _take(self, state: _StepState, msg: Message) -> list[torch.Tensor]:
        tensors, transfer = state.inbox.pop(msg)
        if transfer is not None:
            transfer.wait()
        return tensors

    def _forward(self, a: Action, state: _StepState) -> None:
        s, mb = a.stage, a.micro_batch
        if s == 0:
            x = self._micro_batch(state, mb)[0]
            inputs: list[torch.Tensor] = []
        else:
            meta = state.in_meta[s]
            inputs = self._take(state, ("act", s - 1, mb))
            for t, m in zip(inputs, meta.tensors):
                t.requires_grad_(m.requires_grad and state.train)
            x = meta.pack(inputs)
        with torch.set_grad_enabled(state.train):
            out = self.module.forward_chunk(s // self.p, x)
        if s == self.num_virtual - 1:
            self._last_stage_output(state, s, mb, inputs, out)
            return
        where = f"stage {s} (layers {self.module.parts[s]}..{self.module.parts[s + 1] - 1})"
        meta = PayloadMeta.of(out, where)
        if s in state.out_meta and state.out_meta[s] != meta:
            raise StageIOError(
                f"{where} produced {meta} for micro-batch {mb} but {state.out_meta[s]} for an "
                "earlier micro-batch of this step; micro-batches of one step must share shapes"
            )
        state.out_meta[s] = meta
        _, tensors = PayloadMeta.flatten(out, where)
        if state.train:
            state.saved[(s, mb)] = (inputs, [tensors[i] for i in meta.grad_indices()])
        sendable = [t.detach().contiguous() for t in tensors]
        if self.p == 1:  # next stage is local: hand over in memory
            state.in_meta[s + 1] = meta
            state.inbox[("act", s, mb)] = (sendable, None)
        else:
            state.outbox[("act", s, mb)] = sendable

    def _last_stage_output(
        self, state: _StepState, s: int, mb: int, inputs: list[torch.Tensor], out: Any
    ) -> None:
        if not state.train:
            if self.module.loss_fn is not None:
                state.losses.append(
                    self.module.loss_fn(out, self._micro_batch(state, mb)[1]).detach()
                )
            state.outputs.append(out)
            return
        if self.module.loss_fn is None:
            raise ValueError("train_batch needs the PipelineModule to have a loss_fn")
        loss = self.module.loss_fn(out, self._micro_batch(state, mb)[1])
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        state.losses.append(loss.detach())
        state.saved[(s, mb)] = (inputs, loss / self.micro_batches)

    def _backward(self, a: Action, state: _StepState) -> None:
        s, mb = a.stage, a.micro_batch
        inputs, outputs = state.saved.pop((s, mb))
        if s == self.num_virtual - 1:
            torch.autograd.backward(outputs)
        else:
            grads = self._take(state, ("grad", s + 1, mb))
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if s == 0:
            return
        meta = state.in_meta[s]
        grads_in = []
        for i in meta.grad_indices():
            t = inputs[i]
            grads_in.append(t.grad if t.grad is not None else torch.zeros_like(t))
        if self.p == 1:
            state.inbox[("grad", s, mb)] = (grads_in, None)
        else:
            state.outbox[("grad", s, mb)] = grads_in

    # -- communication ------------------------------------------------------------------------

    def _peer(self, a: Action) -> int:
        return self.grid.stage_to_global(a.peer_stage() % self.p)

    def _post(self, batch: list[Action], state: _StepState) -> None:
        """Post one schedule batch (split in two only while waiting for new shapes).

        Matches ``_simulate``: metadata of this batch's first activation sends goes out at
        once; sends and receives of known shape are posted together; if a first receive's
        metadata is still missing, block for it and post those receives as a second batch.
        """
        for a in batch:
            if a.kind is ActionKind.SEND_ACT and a.stage not in state.announced:
                encoded = state.out_meta[a.stage].encode()
                work = _comm.isend(encoded, self._peer(a), self.grid.pipe_meta_group)
                state.meta_sends.append(_Transfer([work], [encoded]))
                state.announced.add(a.stage)
        missing = [
            a for a in batch if a.kind is ActionKind.RECV_ACT and a.stage not in state.in_meta
        ]
        ready = [a for a in batch if a not in missing]
        self._post_ops(ready, state)
        if missing:
            for a in missing:
                buf = torch.zeros(META_LEN, dtype=torch.int64)
                _comm.recv(buf, self._peer(a), self.grid.pipe_meta_group)
                state.in_meta[a.stage] = PayloadMeta.decode(buf)
            self._post_ops(missing, state)

    def _post_ops(self, actions: list[Action], state: _StepState) -> None:
        if not actions:
            return
        ops: list[tuple[bool, torch.Tensor, int]] = []
        keep: list[torch.Tensor] = []
        received: list[tuple[Message, list[torch.Tensor]]] = []
        for a in actions:
            peer = self._peer(a)
            if a.kind.is_send:
                tensors = state.outbox.pop(a.message())
                keep.extend(tensors)
                ops.extend((True, t, peer) for t in tensors)
                continue
            if a.kind is ActionKind.RECV_ACT:
                buffers = state.in_meta[a.stage].empty(self.device)
            else:  # RECV_GRAD: shaped like the outputs we sent, those that need a gradient
                buffers = [torch.empty_like(o) for o in state.saved[(a.stage, a.micro_batch)][1]]
            ops.extend((False, t, peer) for t in buffers)
            received.append((a.message(), buffers))
        transfer = _Transfer(_comm.batch_send_recv(ops, self.grid.pipe_group), keep)
        state.transfers.append(transfer)
        for msg, buffers in received:
            state.inbox[msg] = (buffers, transfer)

    # -- end of step --------------------------------------------------------------------------

    def _reduce_gradients(self) -> None:
        for key, (group, _) in self.tie_groups.items():
            if group is not None:
                params = list(self.module.tied[key].parameters())
                trainable = [p for p in params if p.requires_grad]
                if trainable and all(p.grad is None for p in trainable):
                    # Every stage holding an occurrence used it in each forward, so its grads
                    # exist unless a hook took them during backward (ds-zero's reducer does):
                    # summing over the tie group now would silently sum zeros.
                    raise RuntimeError(
                        f"tied module {key!r} has no gradients after the last backward on rank "
                        f"{self.grid.global_rank}: a gradient hook (e.g. ds-zero wrapping this "
                        "module) consumed them before ds-pipe could sum them over the stages "
                        "holding the tie; ZeRO inside pipeline stages does not support "
                        "TiedLayerSpec yet: untie the layers, or use reduce_data_parallel=True "
                        "with a plain optimizer"
                    )
                all_reduce_bucketed(params, group, self.reduce_bucket_bytes)
        if self.reduce_data_parallel and self.grid.data_parallel_size > 1:
            all_reduce_bucketed(
                [p for p in self.module.parameters() if p.requires_grad],
                self.grid.data_parallel_group,
                self.reduce_bucket_bytes,
                average_over=self.grid.data_parallel_size,
            )
        if self.max_grad_norm is not None:
            params = [p for p in self.module.parameters() if p.requires_grad]
            skip = set()
            for key, (_, ranks) in self.tie_groups.items():
                if ranks[0] != self.grid.global_rank:  # counted on the tie group's first rank
                    skip.update(id(p) for p in self.module.tied[key].parameters())
            self.last_grad_norm = clip_grad_norm(
                params, skip, self.max_grad_norm, self.grid.pipe_group
            )

    def _optimizer_step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _mean_loss(self, state: _StepState) -> torch.Tensor:
        last = self.grid.stage_to_global(self.p - 1)
        if state.losses:
            loss = torch.stack([x.float() for x in state.losses]).mean().to(self.device)
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.p > 1:
            _comm.broadcast(loss, src=last, group=self.grid.pipe_group)
        return loss


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value
