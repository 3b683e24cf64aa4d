"""``Init``: build a model whose parameters are partitioned as each module finishes ``__init__``,
and ``GatheredParameters``: touch full parameters of a partitioned model for a moment."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

import ds_comm
from ds_zero._bucket import ParamsState, slot_of
from ds_zero._dist import all_gather_single, global_rank_of, group_rank, group_size
from ds_zero._param_meta import mark_stage3, released_data

INIT_ATTR = "_ds_zero_init"


@dataclass
class InitShard:
    """A parameter partitioned by ``Init`` (before ``ds_zero.wrap`` re-lays it into buckets):
    this rank's equal slice of the flattened, padded parameter, in the construction dtype."""

    shard: torch.Tensor
    numel: int
    shape: torch.Size
    group: ProcessGroup | None


@torch.no_grad()
def _partition_param(p: nn.Parameter, group: ProcessGroup | None, ds_id: int) -> None:
    world, rank = group_size(group), group_rank(group)
    flat = p.detach().reshape(-1)
    shard_n = -(-flat.numel() // world)
    shard = torch.zeros(shard_n, dtype=flat.dtype, device=flat.device)
    lo, hi = rank * shard_n, min((rank + 1) * shard_n, flat.numel())
    if hi > lo:
        shard[: hi - lo].copy_(flat[lo:hi])
    setattr(p, INIT_ATTR, InitShard(shard, flat.numel(), p.shape, group))
    mark_stage3(p, p.shape, ds_id)
    # released as DeepSpeed's: no elements, so an in-place op on it (an init of a weight the
    # caller did not gather) does nothing; the full size is in ds_shape / ds_numel
    p.data = released_data(p)


def _released(p: nn.Parameter, info: InitShard) -> bool:
    return p.numel() != info.numel


@torch.no_grad()
def _gather_init_into(p: nn.Parameter, info: InitShard) -> None:
    world = group_size(info.group)
    full = torch.empty(info.shard.numel() * world, dtype=info.shard.dtype, device=info.shard.device)
    if world == 1:
        full.copy_(info.shard)
    else:
        all_gather_single(full, info.shard, group=info.group)
    p.data = full[: info.numel].view(info.shape)


@torch.no_grad()
def full_value(p: nn.Parameter) -> torch.Tensor:
    """The full value of a parameter, gathering it if ``Init`` partitioned it (collective)."""
    info: InitShard | None = getattr(p, INIT_ATTR, None)
    if info is None:
        return p.detach()
    world = group_size(info.group)
    full = torch.empty(info.shard.numel() * world, dtype=info.shard.dtype, device=info.shard.device)
    if world == 1:
        full.copy_(info.shard)
    else:
        all_gather_single(full, info.shard, group=info.group)
    delattr(p, INIT_ATTR)
    return full[: info.numel].view(info.shape)


def _all_subclasses(cls: type) -> list[type]:
    out, stack = [], [cls]
    while stack:
        c = stack.pop()
        for s in c.__subclasses__():
            if s not in out:
                out.append(s)
                stack.append(s)
    return out


class Init:
    """Context manager: every module constructed inside has its parameters partitioned over
    ``dp_group`` as soon as its own ``__init__`` returns, so at most one module's parameters are
    ever whole on a rank. Weight initialisation that runs inside a module's ``__init__`` (the
    usual ``reset_parameters``) sees full parameters and produces exactly the values of an
    unpartitioned model with the same seed. Code that touches a sub-module's weights after it
    was built (for example ``self.apply(init_fn)`` in an outer ``__init__``) must do so inside
    ``GatheredParameters(..., modifier_rank=0)``.
    """

    def __init__(
        self,
        dp_group: ProcessGroup | None = None,
        enabled: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if enabled:
            # Without a process group every rank would hold whole parameters of its own.
            ds_comm.require_initialized_if_launched("ds_zero.Init")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"ds_zero.Init: dtype must be None, float32, bfloat16 or float16, got {dtype}"
            )
        self.group = dp_group
        self.enabled = enabled
        # floating-point parameters are cast to it before partitioning (None: kept as built),
        # so a bf16 run's fp32 masters start from the bf16 values, as DeepSpeed's do
        self.dtype = dtype
        self._patched: list[tuple[type, Any]] = []
        self._depth: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self._orig_init_subclass: Any = None
        self._next_id = 0  # DeepSpeed's ds_id: parameters numbered in construction order

    def _wrap(self, orig: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(orig)
        def init(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            # super().__init__ chains re-enter: partition only when the outermost one returns
            depth = self._depth.get(module, 0)
            self._depth[module] = depth + 1
            try:
                orig(module, *args, **kwargs)
            finally:
                self._depth[module] = depth
            if depth == 0:
                for p in module.parameters(recurse=False):
                    if getattr(p, INIT_ATTR, None) is None and slot_of(p) is None:
                        if self.dtype is not None and p.is_floating_point():
                            p.data = p.data.to(self.dtype)
                        _partition_param(p, self.group, self._next_id)
                        self._next_id += 1

        init._ds_zero_wrapped = True  # type: ignore[attr-defined]
        return init

    def _patch(self, cls: type) -> None:
        orig = cls.__dict__.get("__init__")
        if orig is None or getattr(orig, "_ds_zero_wrapped", False):
            return
        self._patched.append((cls, orig))
        cls.__init__ = self._wrap(orig)  # type: ignore[misc]

    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        for cls in [nn.Module, *_all_subclasses(nn.Module)]:
            self._patch(cls)
        # classes defined inside the context are patched when they are created
        self._orig_init_subclass = nn.Module.__dict__.get("__init_subclass__")
        ctx = self

        def init_subclass(cls: type, **kwargs: Any) -> None:
            super(nn.Module, cls).__init_subclass__(**kwargs)
            ctx._patch(cls)

        nn.Module.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        for cls, orig in reversed(self._patched):
            cls.__init__ = orig  # type: ignore[misc]
        self._patched.clear()
        if self._orig_init_subclass is None:
            del nn.Module.__init_subclass__
        else:
            nn.Module.__init_subclass__ = self._orig_init_subclass  # type: ignore[assignment]


class GatheredParameters:
    """Make full parameters available inside the block; with ``modifier_rank`` set, the values
    that rank holds at exit are broadcast and written back into every rank's partitions (fp32
    master included), so a change made on one rank is seen by all.

    Works on parameters partitioned by ``Init``, on stage-3 parameters of a wrapped model (a
    collective: every rank of the group must enter), and is a pass-through for whole
    parameters (stages 0-2 still broadcast and refresh masters when ``modifier_rank`` is set).
    """

    def __init__(
        self,
        params: nn.Parameter | Iterable[nn.Parameter],
        modifier_rank: int | None = None,
        fwd_module: nn.Module | None = None,
        enabled: bool = True,
    ) -> None:
        del fwd_module  # accepted for DeepSpeed compatibility; hooks need no registration here
        self.params = [params] if isinstance(params, torch.Tensor) else list(params)
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._released_after: list[Any] = []
        self._init_gathered: list[nn.Parameter] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        self._released_after = []
        self._init_gathered = []
        buckets = {}
        for p in self.params:
            slot = slot_of(p)
            if slot is not None and slot.bucket.shard_params:
                buckets[id(slot.bucket)] = slot.bucket
            info = getattr(p, INIT_ATTR, None)
            # an enclosing block already gathered it: keep its (maybe modified) values
            if info is not None and _released(p, info):
                _gather_init_into(p, info)
                self._init_gathered.append(p)
        for b in buckets.values():
            if b.state is ParamsState.SHARDED:
                self._released_after.append(b)
            b.gather(exact=True)
        for b in buckets.values():
            b.wait_gathered()

    @torch.no_grad()
    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        if self.modifier_rank is not None:
            commits: dict[int, Callable[[], None]] = {}
            for p in self.params:
                group = self._group_of(p)
                if group_size(group) > 1:
                    src = global_rank_of(group, self.modifier_rank)
                    dist.broadcast(p.data, src, group=group)
                commit = self._write_back(p)
                if commit is not None:
                    commits[id(commit)] = commit
            for commit in commits.values():  # once per stepper, not once per parameter
                commit()
            for p in self.params:
                slot = slot_of(p)
                if slot is not None and slot.bucket.zeropp is not None:
                    slot.bucket.zeropp.modified(slot.bucket)  # ZeRO++ copies are stale now
        for p in self._init_gathered:
            p.data = released_data(p)
        for b in self._released_after:
            b.release()

    @staticmethod
    def _group_of(p: nn.Parameter) -> ProcessGroup | None:
        slot = slot_of(p)
        if slot is not None:
            return slot.bucket.group
        info = getattr(p, INIT_ATTR, None)
        return info.group if info is not None else None

    @staticmethod
    def _write_back(p: nn.Parameter) -> Callable[[], None] | None:
        """Write ``p``'s full value into its shards; returns the commit the stepper holding its
        master needs afterwards (None: nothing to commit)."""
        value = p.detach().reshape(-1)
        info: InitShard | None = getattr(p, INIT_ATTR, None)
        if info is not None:
            world, rank = group_size(info.group), group_rank(info.group)
            n = info.shard.numel()
            lo, hi = rank * n, min((rank + 1) * n, info.numel)
            if hi > lo:
                info.shard[: hi - lo].copy_(value[lo:hi])
            del world
            return None
        slot = slot_of(p)
        if slot is None:
            return None
        b, lay = slot.bucket, slot.bucket.layout
        master = b.live_master() if b.trainable else None
        targets = [(master, b.master_range), (b.local_shard, lay.shard_range(b.rank))]
        for target, (lo, hi) in targets:
            if target is None:
                continue
            hit = lay.intersect(slot.index, lo, hi)
            if hit is not None:
                p_off, t_off, k = hit
                target[t_off : t_off + k].copy_(value[p_off : p_off + k])
        return b.master_commit if master is not None else None
