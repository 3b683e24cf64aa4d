"""The ZeRO-wrapped model and optimizer: ``ds_zero.wrap(model, optimizer, options)``.

Lifecycle of one optimizer step (``Phase``): ``gradient_accumulation_steps`` forward/backward
micro-steps (gradients reduced in buckets as they become ready, overlapped with backward), then
``step()``: global norm and overflow check (one all-reduce), unscale and clip, the partition
update through the ``PartitionStepper``, and the all-gather of updated parameters (stages 1-2;
stage 3 gathers lazily at the next forward).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

import ds_comm
from ds_zero._bucket import Bucket, ParamsState, slot_of
from ds_zero._dist import all_gather_single, group_rank, group_size
from ds_zero._fragment import Fragment
from ds_zero._init import full_value
from ds_zero._layout import split_into_buckets
from ds_zero._loss_scaler import LossScaleOptions, LossScaler, make_loss_scaler
from ds_zero._options import ZeroOptions
from ds_zero._overlap import StepOverlap
from ds_zero._param_access import register_owner
from ds_zero._param_meta import full_numel, full_shape, mark_stage3
from ds_zero._reducer import GradReducer
from ds_zero._shard_store import ParamShardStore
from ds_zero._stage3 import Stage3Scheduler
from ds_zero._stepper import MasterPartition, PartitionStepper, TorchOptimizerStepper
from ds_zero._units import find_units, mark_leaf_parameters, unit_params
from ds_zero._zeropp import ZeroPP

log = logging.getLogger("ds_zero")


class Phase(enum.Enum):
    """Where the wrapped model is between optimizer steps."""

    ACCUMULATING = "accumulating"
    """Micro-steps in progress: gradients live in local accumulation buffers (stages 0-1) or in
    the fp32 reduced-gradient partitions (stages 2-3)."""
    READY = "ready"
    """The last micro-step's gradients are fully reduced into the fp32 partitions; ``step()``
    applies them (or skips on overflow) and frees them."""


def _grad_shard(b: Bucket) -> torch.Tensor:
    """``b``'s reduced-gradient partition; zeros (kept) where no gradient reached the bucket
    this step, so the step and the accessors see the same tensor."""
    if b.grad_shard is None:
        lo, hi = b.master_range
        b.grad_shard = torch.zeros(
            hi - lo, dtype=b.exact_grad_dtype or torch.float32, device=b.device
        )
    return b.grad_shard


def _widened(grad: torch.Tensor) -> torch.Tensor:
    """The fp32 gradient: the norm of a 16-bit one is taken on its exact fp32 widening, with
    the same kernel as an fp32 gradient's, so it has the same bits."""
    return grad if grad.dtype == torch.float32 else grad.float()


def _elementwise(key: str, t: torch.Tensor, master_n: int) -> bool:
    """An optimizer state with one value per element of its partition (not ``step``, which a
    one-element partition would otherwise look like)."""
    return t.numel() == master_n and not (t.numel() == 1 and key == "step")


def _is_expert(p: nn.Parameter) -> bool:
    return bool(getattr(p, "ds_expert", False))


class Zero:
    """A model and optimizer wrapped for ZeRO data parallelism.

    Use ``zero(inputs)`` (or the model itself) for forward, ``zero.backward(loss)`` and
    ``zero.step()`` every micro-step (``step`` applies the update on the accumulation boundary
    and returns whether it did). Parameters of the module become views of flat buckets; the
    optimizer passed in is re-pointed at the fp32 master partitions (keep using it for LR
    schedulers); the state dict of the module itself is not meaningful at stage 3: use
    ``full_state_dict`` / ``state_fragments``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        options: ZeroOptions | None = None,
        *,
        dp_group: ProcessGroup | None = None,
        stepper: PartitionStepper | None = None,
        norm_group: ProcessGroup | None = None,
        param_store: ParamShardStore | None = None,
    ) -> None:
        # Without a process group every rank would be a world of one and train alone.
        ds_comm.require_initialized_if_launched("ds_zero.wrap")
        self.module = model
        self.options = options or ZeroOptions()
        self.dp_group = dp_group
        # ranks holding *other* parameters of the same model (pipeline stages, tensor slices):
        # the clipping norm is over the whole model, so their squared norms are added too
        self.norm_group = norm_group
        self.world = group_size(dp_group)
        self.rank = group_rank(dp_group)
        opts = self.options
        named = list(model.named_parameters())
        if not named:
            raise ValueError("ds_zero.wrap: the model has no parameters")
        self.names = {id(p): n for n, p in named}
        # each parameter knows its ZeRO (weakly): DeepSpeed's per-parameter accessors
        register_owner(self, [p for _, p in named])
        self.param_dtype = opts.param_dtype or named[0][1].dtype
        group_of = self._optimizer_groups(named, optimizer, stepper)
        if stepper is None:
            assert optimizer is not None
            stepper = TorchOptimizerStepper(optimizer)
        self.optimizer = optimizer
        self.stepper = stepper
        if param_store is not None and opts.stage != 3:
            raise ValueError(
                f"ds_zero.wrap: param_store holds stage-3 parameter shards; stage is {opts.stage} "
                "(parameter offload needs stage 3)"
            )
        self.param_store = param_store
        self.scaler: LossScaler = make_loss_scaler(
            opts.loss_scaling
            if opts.loss_scaling is not None or self.param_dtype != torch.float16
            else LossScaleOptions()
        )
        self.phase = Phase.ACCUMULATING
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        self._stepped_at = 0
        self._in_backward = False
        self._boundary_override: bool | None = None
        self._boundary = False
        self._grad_norm: torch.Tensor | None = None
        self._norm_weights: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self.buckets: list[Bucket] = []
        self.unit_buckets: dict[nn.Module, list[Bucket]] = {}
        self.scheduler: Stage3Scheduler | None = None
        self._unbucketed: list[nn.Parameter] = []
        # ZeRO++ process groups are created here, on every rank in the same order
        self.zeropp: ZeroPP | None = None
        if opts.zeropp:
            self.zeropp = ZeroPP(
                dp_group=dp_group,
                quantized_weights=opts.quantized_weights,
                quantized_nontrainable_weights=opts.quantized_nontrainable_weights,
                quantized_gradients=opts.quantized_gradients,
                hpz_partition_size=opts.hpz_partition_size,
                node_size=opts.ranks_per_node,
            )
        self._build_buckets(model, named, group_of)
        self.trainable = [b for b in self.buckets if b.trainable]
        # A stepper that takes the unscale/clip factor in step() (an offload stepper) gets each
        # partition's gradient as soon as its reduction finishes, so its device-to-host copy
        # overlaps the rest of backward; ZeRO then never scales the gradients in place.
        self._stream_grads = bool(getattr(self.stepper, "accepts_grad_scale", False))
        position = {id(p): i for i, (_, p) in enumerate(named)}
        self.partitions = [
            MasterPartition(
                k,
                b.optim_group or 0,
                b.master,
                b.param_shard_view(),  # type: ignore[arg-type]
                param_writer=b.write_shard if b.shard_store is not None else None,
                order=min(position[id(p)] for p in b.params),
                grad_dtype=self._exact_grad_dtype(b),
            )
            for k, b in enumerate(self.trainable)
        ]
        self.stepper.setup(self.partitions, self._group_options)
        self._adopt_grad_dtypes()
        self._partition_of = {b.index: k for k, b in enumerate(self.trainable)}
        self._streamed: set[int] = set()
        # Partitions whose gradient the stepper holds a host copy of (``holds_grad``): their
        # device gradient is dropped at hand-over, so an offloaded step keeps no fp32
        # gradient on the device (4 bytes per parameter); the norm each one had, for clipping.
        self._held_norms: dict[int, torch.Tensor] = {}
        # No factor will ever be applied and no step skipped (no clipping, no loss scaling, no
        # fp16 overflow check): a stepper that takes final gradients starts each partition's
        # update as its gradient arrives, during backward
        self._final_grads = (
            self._stream_grads
            and bool(getattr(self.stepper, "accepts_final_grads", False))
            and opts.gradient_clipping <= 0
            and self.param_dtype != torch.float16
            and not self.scaler.dynamic
            and self.scaler.scale == 1.0
        )
        if not self.stepper.masters_on_device:
            # the stepper holds the fp32 masters (CPU / NVMe): read and write them through it
            commit = self.stepper.state_loaded  # one object: GatheredParameters calls it once
            for k, b in enumerate(self.trainable):
                b.master_source = lambda k=k: self.stepper.state_tensors(k)["master"].reshape(-1)
                b.master_commit = commit
        self.reducer = GradReducer(
            self._reduction_order(None),
            opts.reduce_dtype,
            local_accumulation=opts.stage <= 1,
            max_inflight=opts.max_inflight_reductions if opts.overlap_comm else 0,
            on_issued=self._on_reduce_issued,
            on_final=self._on_grad_final if self._stream_grads else None,
        )
        self._install_hooks(model)
        # A stepper that overlaps its update with the next forward (an offload stepper's CPU
        # Adam on a worker thread): step() returns at once, reads of a partition wait for it
        self._overlap: StepOverlap | None = None
        if self._stream_grads and getattr(self.stepper, "overlaps_step", False):
            units = self._units if opts.stage == 3 else find_units(model, opts.stage3_units)
            self._overlap = StepOverlap(
                model, self.stepper, self.trainable, units, unit_params(model, units)
            )

    # ---- construction ------------------------------------------------------------------
    def _optimizer_groups(
        self,
        named: list[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer | None,
        stepper: PartitionStepper | None,
    ) -> dict[int, int]:
        if optimizer is None and stepper is None:
            raise ValueError("ds_zero.wrap: pass an optimizer (torch.optim.Optimizer) or a stepper")
        group_of: dict[int, int] = {}
        if optimizer is not None:
            model_ids = {id(p) for _, p in named}
            for gi, g in enumerate(optimizer.param_groups):
                for p in g["params"]:
                    if id(p) not in model_ids:
                        raise ValueError(
                            f"ds_zero.wrap: optimizer param group {gi} holds a tensor of shape "
                            f"{tuple(full_shape(p))} that is not a parameter of the model; build the "
                            "optimizer from model.parameters()"
                        )
                    group_of[id(p)] = gi
            # The live param-group dicts (a stepper ignores "params"): LR schedules edit
            # optimizer.param_groups, and a stepper reads lr/betas from them at every step.
            self._group_options = list(optimizer.param_groups)
        else:
            group_of = {id(p): 0 for _, p in named if p.requires_grad}
            self._group_options = [{}]
        for name, p in named:
            if p.requires_grad and id(p) not in group_of:
                raise ValueError(
                    f"ds_zero.wrap: parameter {name!r} requires grad but is not in the optimizer; "
                    "add it to an optimizer param group or set requires_grad=False"
                )
        return group_of

    def _exact_grad_dtype(self, b: Bucket) -> torch.dtype:
        """The dtype in which bucket ``b``'s final gradient is exactly what ZeRO would hand over
        in fp32: the compute dtype where it is the autograd result itself, fp32 otherwise.

        The compute dtype needs all of: a 16-bit compute dtype; one rank in the bucket's group
        (its own expert group for MoE: any reduction sums in fp32, and divides by the world);
        a reduce dtype that does not round it (fp32 or the compute dtype itself); one micro-step
        per step (accumulation sums in fp32; a boundary the caller sets off anyway is still
        summed in fp32, see ``Bucket.finish_reduce``); and a stepper that takes the
        unscale/clip factor in ``step`` and applies it in fp32 (otherwise ZeRO scales the
        gradients in place, which would round them). Loss scaling and clipping keep it exact:
        the norm is taken on the widened gradient and the factor is applied by the stepper."""
        opts = self.options
        if (
            self._stream_grads
            and self.param_dtype in (torch.bfloat16, torch.float16)
            and b.world == 1
            and opts.reduce_dtype in (torch.float32, self.param_dtype)
            and opts.gradient_accumulation_steps == 1
        ):
            return self.param_dtype
        return torch.float32

    def _adopt_grad_dtypes(self) -> None:
        """Hand over in the compute dtype the partitions whose stepper keeps that dtype
        (``grad_dtype(index)``, optional: an offload stepper's host buffers): 2 bytes per
        parameter to copy to the host and for the CPU optimizer to read instead of 4."""
        wants = getattr(self.stepper, "grad_dtype", None)
        self.grad_handover_dtypes: list[torch.dtype] = []
        for part, b in zip(self.partitions, self.trainable):
            narrow = callable(wants) and part.grad_dtype != torch.float32
            dtype = (
                part.grad_dtype
                if narrow and wants(part.index) == part.grad_dtype
                else torch.float32
            )
            b.exact_grad_dtype = None if dtype == torch.float32 else dtype
            self.grad_handover_dtypes.append(dtype)
        narrow = sum(d != torch.float32 for d in self.grad_handover_dtypes)
        if narrow:
            log.debug(
                "ds_zero: %d of %d partitions hand their gradient to the stepper in %s "
                "(exact: one rank, one micro-step per step)",
                narrow, len(self.partitions), self.param_dtype,
            )  # fmt: skip

    def _key(self, p: nn.Parameter, group_of: dict[int, int]) -> tuple[Any, ...]:
        optim_group = group_of.get(id(p)) if p.requires_grad else None
        group = getattr(p, "ds_expert_dp_group", None) if _is_expert(p) else self.dp_group
        if _is_expert(p) and group is None:
            raise ValueError(
                f"parameter {self.names[id(p)]!r} has ds_expert=True but no ds_expert_dp_group; "
                "ds-moe must set the expert data-parallel ProcessGroup on expert parameters"
            )
        # ranks of the norm group holding the same values (tensor-parallel replicas of a
        # norm weight): such a parameter's buckets count once in the clipping norm
        replicas = int(getattr(p, "ds_norm_replicas", 1))
        return (optim_group, id(group) if group is not None else None, group, replicas)

    def _new_bucket(
        self, params: list[nn.Parameter], key: tuple[Any, ...], shard_params: bool
    ) -> Bucket:
        optim_group, _, group, replicas = key
        stage = self.options.stage
        bucket = Bucket(
            len(self.buckets),
            [self.names[id(p)] for p in params],
            params,
            group=group,
            param_dtype=self.param_dtype,
            shard_params=shard_params,
            shard_state=stage >= 1,
            optim_group=optim_group,
            align=self.options.align,
            replication=1 if (stage >= 1 or shard_params) else group_size(group),
            host_shard=self.options.host_param_shards,
            pin_host_shard=self.options.pin_param_shards,
            # with on-device masters gathers read the master: nothing for a store to hold
            shard_store=None if self.stepper.masters_on_device else self.param_store,
        )
        bucket.build(full_value, keep_local_shard=not self.stepper.masters_on_device)
        if self.zeropp is not None:
            bucket.zeropp = self.zeropp
            self.zeropp.adopt(bucket)
        bucket.norm_replicas = replicas
        self.buckets.append(bucket)
        return bucket

    def _build_buckets(
        self,
        model: nn.Module,
        named: list[tuple[str, nn.Parameter]],
        group_of: dict[int, int],
    ) -> None:
        opts = self.options
        replicated: list[nn.Parameter] = []
        if opts.stage == 3:
            units = find_units(model, opts.stage3_units)
            mark_leaf_parameters(model)
            touched = unit_params(model, units)
            owner: dict[int, nn.Module] = {}
            for unit in units:
                for p in touched[id(unit)]:
                    owner.setdefault(id(p), unit)
            by_unit: dict[int, dict[tuple[Any, ...], list[nn.Parameter]]] = {}
            persistent = 0
            for ds_id, (_, p) in enumerate(named):
                # full sizes: a parameter partitioned by Init has no elements until built
                numel = full_numel(p)
                mark_stage3(p, full_shape(p), ds_id)
                # DeepSpeed's mark_persistent_parameters: small parameters stay whole while
                # their running total fits under model_persistence_threshold
                fits = persistent + numel <= opts.model_persistence_threshold
                if fits and numel <= opts.param_persistence_threshold:
                    persistent += numel
                    replicated.append(p)
                    continue
                unit = owner[id(p)]
                by_unit.setdefault(id(unit), {}).setdefault(self._key(p, group_of), []).append(p)
            own: dict[int, list[Bucket]] = {}
            for unit in units:
                own[id(unit)] = [
                    self._new_bucket(ps, key, shard_params=True)
                    for key, ps in by_unit.get(id(unit), {}).items()
                ]
            for unit in units:
                needed = {id(b): b for b in own[id(unit)]}
                for p in touched[id(unit)]:
                    slot = slot_of(p)
                    if slot is not None and slot.bucket.shard_params:
                        needed.setdefault(id(slot.bucket), slot.bucket)
                self.unit_buckets[unit] = list(needed.values())
            self._units = units
        else:
            replicated = [p for _, p in named]
        trainable = [p for p in replicated if p.requires_grad]
        for p in replicated:
            if not p.requires_grad:
                with torch.no_grad():
                    p.data = full_value(p).to(self.param_dtype)
                self._unbucketed.append(p)
        by_key: dict[tuple[Any, ...], list[nn.Parameter]] = {}
        for p in reversed(trainable):  # reverse registration ~ the order backward produces grads
            by_key.setdefault(self._key(p, group_of), []).append(p)
        for key, ps in by_key.items():
            for idx in split_into_buckets([full_numel(p) for p in ps], opts.reduce_bucket_size):
                self._new_bucket([ps[i] for i in idx], key, shard_params=False)

    def _reduction_order(self, forward_order: Sequence[nn.Module] | None) -> list[Bucket]:
        if self.options.stage != 3:
            return list(self.buckets)
        units = list(forward_order) if forward_order else self._units
        order: dict[int, Bucket] = {}
        for unit in reversed(units):
            for b in self.unit_buckets[unit]:
                order.setdefault(id(b), b)
        for b in self.buckets:
            order.setdefault(id(b), b)
        return list(order.values())

    def _install_hooks(self, model: nn.Module) -> None:
        for b in self.trainable:
            for p in b.params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        if self.options.stage == 3:
            self.scheduler = Stage3Scheduler(
                model, self._units, self.unit_buckets, self.options, self._on_backward_start
            )
            self.scheduler.order_listeners.append(
                lambda order: self.reducer.set_order(self._reduction_order(order))
            )
        if self.param_dtype != torch.float32:
            self._handles.append(
                model.register_forward_pre_hook(self._cast_inputs, with_kwargs=True, prepend=True)
            )

    def _cast_inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        del module
        dtype = self.param_dtype

        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
                return x.to(dtype)
            if isinstance(x, (list, tuple)):
                return type(x)(cast(y) for y in x)
            if isinstance(x, dict):
                return {k: cast(v) for k, v in x.items()}
            return x

        return cast(args), cast(kwargs)

    # ---- backward --------------------------------------------------------------------------
    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Whether the following backward passes end an accumulation window (None: counted
        from ``gradient_accumulation_steps``). A caller that steps only at the end of each
        window (DeepSpeed's ``engine.set_gradient_accumulation_boundary``) sets it per pass."""
        self._boundary_override = is_boundary

    def _on_backward_start(self, queue: bool = True) -> None:
        if self._in_backward:
            return
        self._in_backward = True
        boundary = self._boundary_override
        if boundary is None:
            boundary = (self.micro_steps + 1) % self.options.gradient_accumulation_steps == 0
        self._boundary = boundary
        self.reducer.start(sync=boundary)
        if queue:
            Variable._execution_engine.queue_callback(self._finish_backward)

    def _grad_ready(self, param: torch.Tensor) -> None:
        self._on_backward_start()
        self.reducer.param_ready(param)

    def _on_grad_final(self, bucket: Bucket) -> None:
        k = self._partition_of[bucket.index]
        if bucket.grad_shard is not None and k not in self._streamed:
            self._streamed.add(k)
            self._hand_over(k, bucket.grad_shard)
            holds = getattr(self.stepper, "holds_grad", None)
            if callable(holds) and holds(k):
                # the same kernel as step()'s norm of the kept gradients; the device memory is
                # reused once the stepper's copy is done (it records the copy on the tensor)
                self._held_norms[k] = torch._foreach_norm([_widened(bucket.grad_shard)])[0]
                bucket.grad_shard = None

    def _hand_over(self, k: int, grad: torch.Tensor) -> None:
        if self._final_grads:
            self.stepper.grad_ready(k, grad, early_copy=True, final=True)  # type: ignore[call-arg]
        else:
            self.stepper.grad_ready(k, grad, early_copy=True)  # type: ignore[call-arg]

    def _on_reduce_issued(self, bucket: Bucket) -> None:
        if bucket.shard_params:
            bucket.release()

    def _finish_backward(self) -> None:
        if not self._in_backward:
            return
        self.reducer.finish()
        if self.scheduler is not None:
            self.scheduler.finish_backward()
        self._in_backward = False
        self.micro_steps += 1
        self.phase = Phase.READY if self._boundary else Phase.ACCUMULATING

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(
        self, loss: torch.Tensor, *, retain_graph: bool = False, scale_wrt_gas: bool = True
    ) -> None:
        """Backward of ``loss`` scaled by the loss scale and, with ``scale_wrt_gas``, divided
        by the accumulation steps (False: the caller already averaged over the window)."""
        gas = self.options.gradient_accumulation_steps if scale_wrt_gas else 1
        factor = self.scaler.scale / gas
        before = self.micro_steps
        (loss * factor if factor != 1 else loss).backward(retain_graph=retain_graph)
        if self.micro_steps == before:
            # no hook fired (nothing trainable received a gradient): still take part in the
            # collectives every other rank issues
            self._on_backward_start(queue=False)
            self._finish_backward()

    # ---- optimizer step ------------------------------------------------------------------
    def is_gradient_accumulation_boundary(self) -> bool:
        return self.phase is Phase.READY

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm (unscaled, before clipping) of the last applied step."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def _grads(self) -> list[torch.Tensor | None]:
        """Each partition's reduced gradient; None where the stepper holds it (its norm is in
        ``_held_norms``)."""
        return [
            None if k in self._held_norms else _grad_shard(b) for k, b in enumerate(self.trainable)
        ]

    def _global_sq_norm(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        if not grads:
            return torch.zeros(())
        if self._norm_weights is None:
            # built once: a host-to-device copy every step would stall the host on the stream
            self._norm_weights = torch.tensor(
                [1.0 / (b.replication * b.norm_replicas) for b in self.trainable],
                device=self.trainable[0].device,
            )
        kept = [_widened(g) for g in grads if g is not None]
        live = iter(torch._foreach_norm(kept) if kept else ())
        norms = [self._held_norms[k] if g is None else next(live) for k, g in enumerate(grads)]
        sq = (torch.stack(norms).float().pow(2) * self._norm_weights).sum()
        if self.world > 1:
            dist.all_reduce(sq, group=self.dp_group)
        if self.norm_group is not None and group_size(self.norm_group) > 1:
            dist.all_reduce(sq, group=self.norm_group)
        return sq

    @torch.no_grad()
    def step(self) -> bool:
        """Apply the update at an accumulation boundary; returns False on non-boundary
        micro-steps and on skipped (overflowed) steps."""
        if self.phase is not Phase.READY or self._stepped_at == self.micro_steps:
            return False
        self._stepped_at = self.micro_steps
        self.phase = Phase.ACCUMULATING
        grads = self._grads()
        for part, g in zip(self.partitions, grads):
            if g is None:  # held by the stepper, handed over in backward
                continue
            if not self._stream_grads:
                self.stepper.grad_ready(part.index, g)
            elif part.index not in self._streamed:  # no gradient this step (zeros): copy now
                self._streamed.add(part.index)
                self._hand_over(part.index, g)
        sq = self._global_sq_norm(grads)
        scale = self.scaler.scale
        if self.param_dtype == torch.float16 or scale != 1.0:
            overflow = not math.isfinite(float(sq))
            self.scaler.update(overflow)
            if overflow:
                self.skipped_steps += 1
                self.zero_grad()
                return False
        norm = sq.sqrt() / scale
        self._grad_norm = norm
        clip = self.options.gradient_clipping
        coef: torch.Tensor | float | None = None
        if clip > 0:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0) / scale
        elif scale != 1.0:
            coef = 1.0 / scale
        if self._stream_grads:
            # never scaled in place here: 1.0 tells the stepper its early copies are final
            factor = 1.0 if coef is None else coef
            if self._overlap is not None:
                self.stepper.step(grads, grad_scale=factor, wait=False)  # type: ignore[call-arg]
                self._overlap.after_step()
            else:
                self.stepper.step(grads, grad_scale=factor)  # type: ignore[call-arg]
            self._streamed.clear()
            self._held_norms.clear()
        else:
            if coef is not None:
                torch._foreach_mul_(grads, coef)
            self.stepper.step(grads)
        if self.zeropp is not None:
            self.zeropp.invalidate(self.trainable)  # hpZ copies hold the old parameters
        if self.param_store is not None:
            self.param_store.flush()  # a failed shard write is this step's error, not a later one
        self.zero_grad()
        self._refresh_params(trainable=self._overlap is None)
        self.global_steps += 1
        return True

    def zero_grad(self) -> None:
        """Drop reduced gradients and local accumulation buffers."""
        self._held_norms.clear()
        if self._streamed:
            # gradients already handed to the stepper for a step that will not happen
            self._streamed.clear()
            skip = getattr(self.stepper, "skip_step", None)
            if skip is not None:
                skip()
        for b in self.buckets:
            b.grad_shard = None
            b.accum = None
            for p in b.params:
                p.grad = None

    def _refresh_params(self, trainable: bool = True) -> None:
        """All-gather updated replicated buckets (``trainable=False``: an overlapping stepper
        is still updating those; they are refreshed as the next forward reaches them)."""
        buckets = [b for b in self.buckets if trainable or not b.trainable]
        works = [w for b in buckets if (w := b.refresh_replicated()) is not None]
        for w in works:
            w.wait()  # type: ignore[attr-defined]

    def synchronize(self) -> None:
        """Wait until the last step's update is complete everywhere (a stepper that overlaps
        its update with the next forward finishes it and replicated parameters are refreshed).
        Reading ``module`` parameters outside a forward right after ``step()`` needs this;
        checkpoints and state dicts call it themselves."""
        if self._overlap is not None:
            self._overlap.synchronize()

    # ---- state: fragments and full state dicts -----------------------------------------------
    def state_fragments(self) -> list[Fragment]:
        """This rank's fp32 master weights and optimizer states, each piece once across ranks
        (stage 0 splits the replicated state evenly so ranks write disjoint pieces)."""
        self.synchronize()
        out: list[Fragment] = []
        for k, b in enumerate(self.trainable):
            tensors = self.stepper.state_tensors(k)
            lo, hi = b.layout.shard_range(b.rank)
            out.extend(self._save_fragments(b, tensors, lo, hi, with_scalars=True))
        out.extend(self._frozen_fragments(for_load=False))
        return out

    def _save_fragments(
        self, b: Bucket, tensors: dict[str, torch.Tensor], lo: int, hi: int, with_scalars: bool
    ) -> list[Fragment]:
        m_lo, _ = b.master_range
        out = []
        master_n = tensors["master"].numel()
        for i, name in enumerate(b.names):
            hit = b.layout.intersect(i, lo, hi)
            if hit is not None:
                p_off, r_off, n = hit
                t_off = lo - m_lo + r_off
                for key, t in tensors.items():
                    if key == "master" or _elementwise(key, t, master_n):
                        full = name if key == "master" else f"optimizer.{key}.{name}"
                        out.append(
                            Fragment(full, b.shapes[i], t.dtype, p_off, n, t[t_off : t_off + n])
                        )
            if with_scalars and b.layout.owner_of_first_element(i) == b.rank:
                out.extend(self._scalar_fragments(tensors, name, master_n))
        return out

    def grad_fragments(self, *, for_write: bool = False) -> list[Fragment]:
        """This rank's pieces of the reduced gradients, named after the parameters (the fp32
        partitions ``step()`` applies: averaged over the data-parallel group, times the fp16
        loss scale until the step unscales them). Reading (``for_write=False``) gives each
        piece on exactly one rank, as ``state_fragments`` does; writing gives every piece
        this rank holds (stage 0 holds all of them), views to fill in place.

        Defined after the backward of an accumulation boundary and, at stages 2-3 (which
        reduce every micro-step), between micro-steps too: a RuntimeError says so elsewhere,
        and where an offloading stepper already took a gradient during backward.
        """
        self._check_grads_defined()
        out: list[Fragment] = []
        for b in self.trainable:
            lo, hi = b.master_range if for_write else b.layout.shard_range(b.rank)
            out.extend(self._save_fragments(b, {"master": _grad_shard(b)}, lo, hi, False))
        return out

    def grad_partition(self, b: Bucket) -> torch.Tensor:
        """Trainable bucket ``b``'s reduced-gradient partition on this rank (its master
        range; fp32, or the compute dtype where that is exact), the tensor ``step()`` applies:
        read it or fill it in place. Defined when ``grad_fragments`` is (the same errors)."""
        self._check_grads_defined()
        return _grad_shard(b)

    def _check_grads_defined(self) -> None:
        """Raise where the reduced gradients are not held here: not reduced yet (stages 0-1
        between micro-steps) or already handed to an offloading stepper."""
        local = any(b.accum is not None for b in self.trainable)
        if self.phase is not Phase.READY and local:
            raise RuntimeError(
                "the gradients are not reduced yet: stages 0-1 accumulate micro-steps locally "
                "and reduce at the accumulation boundary; read them after the boundary "
                "micro-step's backward, before step()"
            )
        if self._held_norms or self._streamed:
            raise RuntimeError(
                "the offloaded optimizer took this step's gradients during backward (streamed "
                "to the host); read gradients with offload_optimizer off, or before backward"
            )

    def elementwise_state_keys(self) -> set[str]:
        """The optimizer states held per element of the parameters (``exp_avg``, ...: those
        saved as fragments of each parameter's shape), not scalars such as ``step``; empty
        before the optimizer's first step creates them."""
        keys: set[str] = set()
        for k in range(len(self.trainable)):
            tensors = self.stepper.state_tensors(k)
            n = tensors["master"].numel()
            keys |= {
                key for key, t in tensors.items() if key != "master" and _elementwise(key, t, n)
            }
        return keys

    @staticmethod
    def _scalar_fragments(
        tensors: dict[str, torch.Tensor], name: str, master_n: int
    ) -> list[Fragment]:
        return [
            Fragment(f"optimizer.{key}.{name}", (1,), t.dtype, 0, 1, t.reshape(1))
            for key, t in tensors.items()
            if key != "master" and (t.numel() != master_n or key == "step") and t.numel() == 1
        ]

    def _frozen_fragments(self, for_load: bool) -> list[Fragment]:
        out = []
        self._frozen_loaded: list[tuple[Bucket, torch.Tensor]] = []
        for b in self.buckets:
            shard = b.local_shard
            if shard is None and self.zeropp is not None and not b.trainable:
                shard = self.zeropp.frozen_shard(b)  # stored quantized
                if for_load and shard is not None:
                    self._frozen_loaded.append((b, shard))  # quantized again after the load
            if b.trainable or shard is None:
                continue
            lo, hi = b.layout.shard_range(b.rank)
            for i, name in enumerate(b.names):
                hit = b.layout.intersect(i, lo, hi)
                if hit is not None:
                    p_off, r_off, n = hit
                    t = shard[r_off : r_off + n]
                    out.append(Fragment(name, b.shapes[i], t.dtype, p_off, n, t))
        for p in self._unbucketed:
            flat = p.detach().reshape(-1)
            per = -(-flat.numel() // self.world)
            lo, hi = self.rank * per, min((self.rank + 1) * per, flat.numel())
            if for_load:  # every rank holds (and must load) the whole frozen parameter
                lo, hi = 0, flat.numel()
            if hi > lo:
                shape = tuple(p.shape)
                out.append(Fragment(self.names[id(p)], shape, p.dtype, lo, hi - lo, flat[lo:hi]))
        return out

    def load_state_fragments(self, fill: Callable[[list[Fragment]], None]) -> None:
        """``fill`` writes checkpoint data into the destination fragments given to it (this
        rank's whole master range: everything at stage 0); parameters are then refreshed."""
        self.synchronize()
        dests: list[Fragment] = []
        for k, b in enumerate(self.trainable):
            tensors = self.stepper.state_tensors(k)
            lo, hi = b.master_range
            master_n = tensors["master"].numel()
            dests.extend(self._save_fragments(b, tensors, lo, hi, with_scalars=False))
            # scalar states: every rank needs them, take them from the first param it holds
            first = next(
                (i for i in range(len(b.names)) if b.layout.intersect(i, lo, hi) is not None), 0
            )
            dests.extend(self._scalar_fragments(tensors, b.names[first], master_n))
        fill(dests + self._frozen_fragments(for_load=True))
        if self.zeropp is not None:
            for b, values in self._frozen_loaded:
                self.zeropp.store_frozen(b, values)
            self.zeropp.invalidate(self.buckets, trainable_only=False)
        self.stepper.state_loaded()
        self._refresh_params()

    @torch.no_grad()
    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Consolidated weights on every rank (a collective): trainable parameters from the fp32
        masters (cast to ``dtype`` if given), frozen ones from the model."""
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for b in self.buckets:
            if b.trainable:
                master = b.live_master()
                assert master is not None
                full = master = master.to(b.device)
                if b.shard_state and b.world > 1:
                    full = torch.empty(b.layout.padded_numel, device=b.device)
                    all_gather_single(full, master.contiguous(), group=b.group)
            else:
                was = b.state
                b.gather(exact=True)
                b.wait_gathered()
                full = b.flat.clone()
                if was is ParamsState.SHARDED:
                    b.release()
            for i, name in enumerate(b.names):
                off, n = b.layout.offsets[i], b.layout.numels[i]
                t = full[off : off + n].view(b.shapes[i]).clone()
                out[name] = t.to(dtype) if dtype is not None else t
        for p in self._unbucketed:
            out[self.names[id(p)]] = p.detach().clone().to(dtype or p.dtype)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load consolidated weights (every rank passes the full dict) into masters/shards."""
        missing = [n for b in self.buckets for n in b.names if n not in state]
        missing += [self.names[id(p)] for p in self._unbucketed if self.names[id(p)] not in state]
        if missing:
            raise KeyError(f"load_full_state_dict: missing keys {missing[:5]} (of {len(missing)})")
        self.synchronize()
        for b in self.buckets:
            lay = b.layout
            targets = [(b.live_master() if b.trainable else None, b.master_range)]
            if b.local_shard is not None:
                targets.append((b.local_shard, lay.shard_range(b.rank)))
            frozen = self.zeropp.frozen_shard(b) if self.zeropp is not None else None
            if frozen is not None:
                targets.append((frozen, lay.shard_range(b.rank)))
            if not b.shard_params:
                targets.append((b.flat, (0, lay.padded_numel)))
            for i, name in enumerate(b.names):
                value = state[name].reshape(-1).to(b.device)
                if value.numel() != lay.numels[i]:
                    raise ValueError(
                        f"load_full_state_dict: {name!r} has {value.numel()} elements, the model "
                        f"expects shape {b.shapes[i]}"
                    )
                for target, (lo, hi) in targets:
                    if target is None:
                        continue
                    hit = lay.intersect(i, lo, hi)
                    if hit is not None:
                        p_off, t_off, n = hit
                        target[t_off : t_off + n].copy_(value[p_off : p_off + n])
            if frozen is not None:
                self.zeropp.store_frozen(b, frozen)  # type: ignore[union-attr]
        if self.zeropp is not None:
            self.zeropp.invalidate(self.buckets, trainable_only=False)
        for p in self._unbucketed:
            p.copy_(state[self.names[id(p)]])
        if not self.stepper.masters_on_device:
            # NVMe-backed masters are written back; stored shards refreshed through param_writer
            self.stepper.state_loaded()

    def close(self) -> None:
        """Remove hooks (the module keeps its flat-buffer parameters) and close the stepper and
        the parameter-shard store where they have ``close`` (an offload stepper's swap files
        are removed: the optimizer state is gone after this, save a checkpoint first)."""
        if self._overlap is not None:
            self._overlap.synchronize()
            self._overlap.remove()
            self._overlap = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.scheduler is not None:
            self.scheduler.remove()
        if self.param_store is not None:
            self.param_store.close()
            self.param_store = None
        close_stepper = getattr(self.stepper, "close", None)
        if callable(close_stepper):
            close_stepper()


def wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    options: ZeroOptions | None = None,
    *,
    dp_group: ProcessGroup | None = None,
    stepper: PartitionStepper | None = None,
    norm_group: ProcessGroup | None = None,
    param_store: ParamShardStore | None = None,
) -> Zero:
    """Wrap ``model`` (already on its device) and an ``optimizer`` built over its parameters.

    ``dp_group``: the ranks holding replicas of these parameters (default: the world).
    ``norm_group``: the ranks holding the rest of the model (pipeline stages), whose squared
    gradient norms are added for clipping and overflow checks; None when this rank's module
    is the whole model.
    ``param_store``: holds stage-3 compute-dtype parameter shards when the stepper keeps the
    fp32 masters off the device (e.g. ds-offload's NVMe store); see ``ParamShardStore``."""
    return Zero(
        model, optimizer, options, dp_group=dp_group, stepper=stepper, norm_group=norm_group,
        param_store=param_store,
    )  # fmt: skip


__all__ = ["Phase", "Zero", "wrap"]
