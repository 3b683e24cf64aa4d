"""One flat bucket of parameters: its compute buffer, fp32 master partition and reduced grads.

A bucket is the unit of every collective: one ``all_gather_single`` to assemble (stage 3) or
refresh (stages 1-2) its parameters, one ``reduce_scatter_single`` (stages 1-3) or ``all_reduce``
(stage 0) for its gradients. Module parameters are views into the bucket's flat buffer, so a
collective writes straight into them. At stage 3 a released bucket frees the buffer's storage
and points each parameter at a tensor with no elements (DeepSpeed's released parameter: in-place
ops on it do nothing, the full size is in ``ds_shape``); a gather points them back at their
views. Tensors autograd saved during forward are views of the same storage, so they read the
re-gathered values in backward.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ds_zero._dist import all_gather_single, group_rank, group_size, reduce_scatter_single
from ds_zero._layout import FlatLayout, make_layout
from ds_zero._param_meta import full_numel, full_shape, released_data
from ds_zero._shard_store import ParamShardStore
from ds_zero._zeropp import ZeroPP


class ParamsState(enum.Enum):
    """What memory a bucket's compute parameters hold."""

    SHARDED = "sharded"
    """Only this rank's shard exists (fp32 master or a compute-dtype local shard); the flat
    buffer's storage is freed and the module parameters have no elements (stage 3 at rest)."""
    GATHERING = "gathering"
    """Flat storage allocated and an all-gather in flight; parameters not yet valid."""
    GATHERED = "gathered"
    """Flat storage holds the full parameters (stages 0-2 always, stage 3 around use)."""


@dataclass(frozen=True)
class ParamSlot:
    """Where a parameter lives: attached to it as ``param._ds_zero_slot``."""

    bucket: Bucket
    index: int


@dataclass
class PendingReduce:
    bucket: Bucket
    work: object | None
    out: torch.Tensor
    source: torch.Tensor


SLOT_ATTR = "_ds_zero_slot"


def slot_of(param: torch.Tensor) -> ParamSlot | None:
    return getattr(param, SLOT_ATTR, None)


class Bucket:
    """Flat storage and partition of a list of parameters that share dtype, process group and
    optimizer param group."""

    def __init__(
        self,
        index: int,
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        *,
        group: ProcessGroup | None,
        param_dtype: torch.dtype,
        shard_params: bool,
        shard_state: bool,
        optim_group: int | None,
        align: int,
        replication: int,
        host_shard: bool = False,
        pin_host_shard: bool = True,
        shard_store: ParamShardStore | None = None,
    ) -> None:
        self.index = index
        self.names: list[str] = list(names)
        self.params: list[nn.Parameter] = list(params)
        self.group = group
        self.world = group_size(group)
        self.rank = group_rank(group)
        self.param_dtype = param_dtype
        self.shard_params = shard_params
        self.shard_state = shard_state or shard_params
        self.optim_group = optim_group
        self.replication = replication
        # stage 3 with parameter offload: the local compute-dtype shard lives in host memory
        self.host_shard = host_shard and shard_params
        self.pin_host_shard = pin_host_shard
        # where the compute-dtype shard lives instead of ``local_shard`` (NVMe offload); only
        # for trainable stage-3 buckets (the caller passes it only when the stepper holds the
        # fp32 masters off the device; otherwise gathers read the on-device master)
        self.shard_store = shard_store if shard_params and optim_group is not None else None
        self.device = self.params[0].device
        # full sizes: a parameter partitioned by Init has no elements until built here
        self.layout: FlatLayout = make_layout(
            [full_numel(p) for p in self.params], self.world, align
        )
        self.shapes = [tuple(full_shape(p)) for p in self.params]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.flat: torch.Tensor = torch.empty(0)
        # each parameter's view of ``flat`` (stage 3 re-points the parameters at them on gather)
        self.views: list[torch.Tensor] = []
        self.master: torch.Tensor | None = None
        self.local_shard: torch.Tensor | None = None
        self.grad_shard: torch.Tensor | None = None
        self.accum: torch.Tensor | None = None
        # The compute dtype when this bucket's final gradient may stay in it: set by ZeRO only
        # where it is exact (one rank, no fp32 accumulation planned) and the stepper keeps its
        # host copy in that dtype. A step that accumulates after all (an accumulation boundary
        # set off by the caller) still reduces into fp32. None: fp32 gradients.
        self.exact_grad_dtype: torch.dtype | None = None
        self.state = ParamsState.GATHERED
        # Where the authoritative fp32 master lives when the optimizer-state holder keeps it off
        # the device (offload): a getter of the live tensor and a commit to call after writing
        # into it. None: ``self.master`` is authoritative.
        self.master_source: Callable[[], torch.Tensor] | None = None
        self.master_commit: Callable[[], None] | None = None
        # An overlapping stepper may still be writing this rank's shard after a step:
        # ``before_read`` blocks until it is in place, ``read_ready`` says whether it is (a
        # prefetch skips a shard that is not). None: always ready.
        self.before_read: Callable[[], None] | None = None
        self.read_ready: Callable[[], bool] | None = None
        self._work: object | None = None
        self._gaps = self._padding_ranges()
        # ZeRO++ (quantized gathers, hpZ secondary partitions, quantized reduction) of a
        # stage-3 bucket; None: plain all-gather and reduce-scatter
        self.zeropp: ZeroPP | None = None

    # ---- construction -------------------------------------------------------------------
    def live_master(self) -> torch.Tensor | None:
        """The fp32 master partition to read or write (the stepper's when it holds it)."""
        return self.master_source() if self.master_source is not None else self.master

    @property
    def trainable(self) -> bool:
        return self.optim_group is not None

    @property
    def master_range(self) -> tuple[int, int]:
        """Flat range of the fp32 master held here: this rank's shard, or all (stage 0)."""
        if self.shard_state:
            return self.layout.shard_range(self.rank)
        return 0, self.layout.padded_numel

    def _padding_ranges(self) -> list[tuple[int, int]]:
        gaps, cursor = [], 0
        for off, n in zip(self.layout.offsets, self.layout.numels):
            if off > cursor:
                gaps.append((cursor, off))
            cursor = off + n
        if cursor < self.layout.padded_numel:
            gaps.append((cursor, self.layout.padded_numel))
        return gaps

    @torch.no_grad()
    def build(
        self, full_value: Callable[[nn.Parameter], torch.Tensor], keep_local_shard: bool
    ) -> None:
        """Copy parameters into the flat buffer and the fp32 master, then point the module
        parameters at the flat buffer (freeing their old storage)."""
        lay = self.layout
        flat = torch.empty(lay.padded_numel, dtype=self.param_dtype, device=self.device)
        for lo, hi in self._gaps:
            flat[lo:hi].zero_()
        m_lo, m_hi = self.master_range
        alias_master = self.param_dtype == torch.float32 and not self.shard_params
        master = None
        if self.trainable:
            master = (
                flat[m_lo:m_hi] if alias_master else torch.zeros(m_hi - m_lo, device=self.device)
            )
        for i, p in enumerate(self.params):
            value = full_value(p).reshape(-1)
            off, n = lay.offsets[i], lay.numels[i]
            flat[off : off + n].copy_(value)
            if master is not None and not alias_master:
                hit = lay.intersect(i, m_lo, m_hi)
                if hit is not None:
                    p_off, m_off, k = hit
                    master[m_off : m_off + k].copy_(value[p_off : p_off + k])
            del value
        self.flat = flat
        self.master = master
        self.views = [
            flat[off : off + n].view(shape)
            for off, n, shape in zip(lay.offsets, lay.numels, self.shapes)
        ]
        for i, p in enumerate(self.params):
            p.data = self.views[i]
            setattr(p, SLOT_ATTR, ParamSlot(self, i))
        if self.shard_store is not None:
            s_lo, s_hi = lay.shard_range(self.rank)
            self.shard_store.add(self.index, flat[s_lo:s_hi])
        elif self.shard_params and (keep_local_shard or master is None or self.host_shard):
            s_lo, s_hi = lay.shard_range(self.rank)
            self.local_shard = (
                _host_copy(flat[s_lo:s_hi], self.pin_host_shard)
                if self.host_shard
                else flat[s_lo:s_hi].clone()
            )
        if self.shard_params:
            self._free_flat()
            self.state = ParamsState.SHARDED

    # ---- parameters: gather / release (stage 3) -------------------------------------------
    def _free_flat(self) -> None:
        storage = self.flat.untyped_storage()
        if storage.size() != 0:
            storage.resize_(0)
        empty = released_data(self.flat)
        for p in self.params:
            p.data = empty

    def _alloc_flat(self) -> None:
        size = self.layout.padded_numel * self.flat.element_size()
        storage = self.flat.untyped_storage()
        if storage.size() != size:
            storage.resize_(size)
        for p, view in zip(self.params, self.views):
            p.data = view

    def gather_source(self) -> torch.Tensor:
        """This rank's shard of the parameters, read by the all-gather."""
        if self.local_shard is not None:
            return self.local_shard
        assert self.master is not None
        return self.master

    @torch.no_grad()
    def gather(self, exact: bool = False) -> None:
        """Issue the all-gather of a sharded bucket (async); no-op if already gathered.
        ``exact``: the stored values, never ZeRO++'s quantized or secondary-partition gathers
        (``GatheredParameters``, consolidated state dicts), as DeepSpeed's exact gathers."""
        if self.state is not ParamsState.SHARDED:
            return
        if self.before_read is not None:
            self.before_read()
        self._alloc_flat()
        lo, hi = self.layout.shard_range(self.rank)
        mine = self.flat[lo:hi]
        if self.zeropp is not None and self.zeropp.fills_own_part(self, exact):
            pass  # gathered from the hpZ secondary partitions or the quantized frozen shard
        elif self.shard_store is not None:
            src = self.shard_store.acquire(self.index)
            asynchronous = mine.device.type != "cpu" and src.is_pinned()
            mine.copy_(src, non_blocking=asynchronous)
            self.shard_store.release(self.index, _copy_done() if asynchronous else None)
        else:
            src = self.gather_source()
            # a pinned host shard is copied asynchronously on the current stream, which the
            # all-gather (and any use of the parameters) is ordered after
            mine.copy_(src, non_blocking=src.device.type == "cpu" and src.is_pinned())
        if self.world == 1:
            self.state = ParamsState.GATHERED
            return
        work = self.zeropp.gather(self, mine, exact) if self.zeropp is not None else None
        if work is None:
            work = all_gather_single(self.flat, mine, group=self.group, async_op=True)
        self._work = work
        self.state = ParamsState.GATHERING

    def readable(self) -> bool:
        """This rank's shard holds the last step's values (an overlapping stepper is done)."""
        return self.read_ready is None or self.read_ready()

    def wait_gathered(self) -> None:
        if self.state is ParamsState.GATHERING:
            self._work.wait()  # type: ignore[attr-defined]
            self._work = None
            self.state = ParamsState.GATHERED

    def release(self) -> None:
        """Free the full parameters of a sharded bucket (no-op for stages 0-2)."""
        if not self.shard_params or self.state is ParamsState.SHARDED:
            return
        self.wait_gathered()
        if self.zeropp is not None:
            self.zeropp.on_release(self)
        self._free_flat()
        self.state = ParamsState.SHARDED

    @torch.no_grad()
    def refresh_replicated(self) -> object | None:
        """After an optimizer step (stages 1-2, persistent stage-3 params): all-gather the updated
        shards into the full buffer. Returns the async work (or None)."""
        if self.shard_params or not self.shard_state or self.world == 1:
            return None
        lo, hi = self.layout.shard_range(self.rank)
        return all_gather_single(self.flat, self.flat[lo:hi], group=self.group, async_op=True)

    # ---- gradients -------------------------------------------------------------------------
    def has_grads(self) -> bool:
        return any(p.grad is not None for p in self.params)

    @torch.no_grad()
    def take_grads(self, dtype: torch.dtype) -> torch.Tensor:
        """Move the parameters' grads (plus any accumulated micro-step grads) into one flat
        tensor of ``dtype`` and drop ``param.grad`` so its memory is reused at once."""
        lay = self.layout
        flat = torch.empty(lay.padded_numel, dtype=dtype, device=self.device)
        for lo, hi in self._gaps:
            flat[lo:hi].zero_()
        dst, src = [], []
        for i, p in enumerate(self.params):
            off, n = lay.offsets[i], lay.numels[i]
            if p.grad is None:
                flat[off : off + n].zero_()
            else:
                dst.append(flat[off : off + n])
                src.append(p.grad.reshape(-1))
                p.grad = None
        for d, s in zip(dst, src):
            d.copy_(s)
        if self.accum is not None:
            flat.add_(self.accum)
            self.accum = None
        return flat

    def accumulate_locally(self, dtype: torch.dtype) -> None:
        """Non-boundary micro-step of stages 0-1: keep grads here, no communication."""
        self.accum = self.take_grads(dtype)

    @torch.no_grad()
    def issue_reduce(self, dtype: torch.dtype) -> PendingReduce:
        if self.world == 1 and self.exact_grad_dtype is not None and self.accum is None:
            # nothing to reduce: the autograd gradients themselves, in their own dtype (an
            # fp32 copy would hold the same values in twice the bytes)
            flat = self.take_grads(self.exact_grad_dtype)
            return PendingReduce(self, None, flat, flat)
        flat = self.take_grads(dtype)
        if self.world == 1:
            return PendingReduce(self, None, flat, flat)
        flat.div_(self.world)
        if not self.shard_state:
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            return PendingReduce(self, work, flat, flat)
        if self.zeropp is not None and self.zeropp.quantizes_reduce(self):
            # qgZ: two int4 all-to-all hops, synchronous (the second needs the first's sums)
            out = self.zeropp.reduce(flat, self.layout.shard_numel)
            return PendingReduce(self, None, out, flat)
        out = torch.empty(self.layout.shard_numel, dtype=dtype, device=self.device)
        work = reduce_scatter_single(out, flat, group=self.group, async_op=True)
        return PendingReduce(self, work, out, flat)

    @torch.no_grad()
    def finish_reduce(self, pending: PendingReduce, final: bool = True) -> None:
        """Add the reduced gradient to ``grad_shard`` (fp32). ``final``: the last micro-step of
        the accumulation window; its gradient stays in ``exact_grad_dtype`` when nothing was
        accumulated before it (it is then exactly the value fp32 would hold)."""
        if pending.work is not None:
            pending.work.wait()  # type: ignore[attr-defined]
        out = pending.out
        keep = final and self.grad_shard is None and out.dtype == self.exact_grad_dtype
        if out.dtype != torch.float32 and not keep:
            out = out.float()
        if self.grad_shard is None:
            self.grad_shard = out
        elif self.grad_shard.dtype != torch.float32:
            # an unplanned accumulation onto a kept 16-bit gradient: widen it (exactly) first
            self.grad_shard = self.grad_shard.float().add_(out)
        else:
            self.grad_shard.add_(out)

    # ---- optimizer step ----------------------------------------------------------------------
    def write_shard(self, values: torch.Tensor) -> None:
        """New values of this rank's shard (the fp32 master after a step or a load) into the
        shard store; ``values`` may be reused by the caller on return."""
        assert self.shard_store is not None
        self.shard_store.write(self.index, values.reshape(-1))

    def param_shard_view(self) -> torch.Tensor | None:
        """Where updated compute-dtype values go after a step (None: read from the master, or
        written through ``write_shard`` when a shard store holds the shard)."""
        if self.shard_params:
            return self.local_shard
        m_lo, m_hi = self.master_range
        view = self.flat[m_lo:m_hi]
        if self.master is not None and view.data_ptr() == self.master.data_ptr():
            return None  # fp32 stages 0-2: the master is the parameter storage itself
        return view


def _copy_done() -> object:
    """An event on the current device stream, after the copy just queued on it."""
    from ds_accel import get_accelerator

    event = get_accelerator().Event()
    event.record()
    return event


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of ``t``, page-locked when asked and a device exists to copy to/from."""
    if pin and t.device.type != "cpu":
        from ds_accel import get_accelerator

        try:
            # the accelerator's exact-size pinned memory: torch's pinned allocator would round
            # each shard up to a power of two (a 403 MB shard taking 512 MiB of host memory)
            out = get_accelerator().pinned_empty(tuple(t.shape), t.dtype)
            out.copy_(t)
            return out
        except RuntimeError:  # no page-locked memory left: pageable copies are slower, not wrong
            pass
    return t.to("cpu", copy=True)
