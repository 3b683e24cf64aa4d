"""``ParamOffloader``: parameters that live on the CPU or NVMe and visit the device only while
their unit (a transformer block) runs: ZeRO-Infinity's parameter offload on one device.

Units are the children of every ``nn.ModuleList`` plus the root (its remaining parameters). The
fp32 values of a unit live in the optimizer store of an ``OffloadStepper`` (CPU memory or an
NVMe swap file: the store is the only copy), so the CPU Adam step and the forward read the same
bytes. Around each unit's forward and backward a hook fetches the unit into one of at most
``buffer_count`` device buffers (prefetching the next unit in the recorded order) and releases it
after; gradients are accumulated into fp32 host buffers as they are produced and dropped from
the device. ``step()`` runs the CPU Adam over all units and invalidates device copies.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable

from ds_offload._aio import AsyncIO
from ds_offload._coerce import coerce
from ds_offload._options import (
    AioOptions,
    OffloadDevice,
    OffloadOptimizerOptions,
    OffloadParamOptions,
)
from ds_offload._pinned import aligned_empty
from ds_offload._state import CpuStore, NvmeStore
from ds_offload._stepper import OffloadStepper


class UnitState(enum.Enum):
    """Where a unit's parameter values are, as seen by the device."""

    OFFLOADED = "offloaded"  # only in the store (CPU memory or NVMe); params are empty
    RESIDENT = "resident"  # copied into a device buffer; params view it; may be evicted
    ACTIVE = "active"  # resident and in use by a running forward/backward: never evicted


@dataclass
class _Unit:
    index: int
    module: nn.Module
    params: list[nn.Parameter]
    numel: int
    offsets: list[int]
    shapes: list[torch.Size]  # recorded at construction: an offloaded param's .shape is (0,)
    grad: torch.Tensor  # fp32 host accumulation buffer, read by the stepper in place
    state: UnitState = UnitState.OFFLOADED
    buffer: torch.Tensor | None = None  # the device buffer while resident
    pending: set[int] = field(default_factory=set)  # params whose grad has not arrived yet
    # params whose slot of ``grad`` holds nothing of this step yet (all of them after a step):
    # the first gradient is written into the slot instead of added, so no pass zeroes ``grad``
    fresh: set[int] = field(default_factory=set)


@dataclass
class _Part:
    """A unit as ds_zero-style partition for the stepper: master on meta after setup (the
    store holds the only copy)."""

    index: int
    group_index: int
    master: torch.Tensor
    param_shard: torch.Tensor | None = None
    host_grad: torch.Tensor | None = None  # the unit's gradient buffer: the stepper's too


def _chunk_elements(buffer_size: int, biggest_unit: int) -> int:
    """Elements per NVMe read: buffer_size, rounded down to whole 4096-byte pages where it is at
    least one page (file offsets of later pieces then stay O_DIRECT-aligned), at most the largest
    unit (no host memory beyond what any unit needs)."""
    per_page = 4096 // 4
    chunk = buffer_size // per_page * per_page if buffer_size >= per_page else buffer_size
    return max(1, min(chunk, biggest_unit))


def find_units(model: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            units.extend(m.children())
    return units


class ParamOffloader:
    """Offload ``model``'s parameters (and its optimizer state) to ``config.device``.

    config: an ``offload_param`` section; the optimizer state goes to the same device, with
        ``optimizer_config`` (an ``offload_optimizer`` section) for its other knobs.
    hparams: AdamW hyper-parameters (lr, betas, eps, weight_decay); ``self.group_options[0]``
        is read at every step, so it can be changed as a scheduler would.
    device: where forward/backward run (default: the accelerator's current device).
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        *,
        hparams: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        optimizer_config: dict[str, Any] | None = None,
        aio: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        config = coerce(OffloadParamOptions, config, "zero_optimization.offload_param")
        if not config.enabled:
            raise ValueError(
                "ParamOffloader: zero_optimization.offload_param.device is 'none'; set it to "
                "'cpu' or 'nvme'"
            )
        aio = coerce(AioOptions, aio, "aio")
        if device is None:
            from ds_accel import get_accelerator

            device = get_accelerator().device()
        self.device = torch.device(device)
        self.config = config
        self.model = model
        self.group_options = [dict(hparams or {})]
        opt_cfg = {"device": config.device.value, "pin_memory": config.pin_memory,
                   "buffer_count": config.buffer_count, **(optimizer_config or {})}  # fmt: skip
        if config.device is OffloadDevice.nvme:
            opt_cfg["nvme_path"] = str(config.nvme_path)
        if opt_cfg.get("max_in_cpu"):
            raise ValueError(
                "ParamOffloader: optimizer_config max_in_cpu is not used here (the optimizer store "
                "is the parameters' only copy); set zero_optimization.offload_param.max_in_cpu"
            )
        self.stepper = OffloadStepper(
            coerce(OffloadOptimizerOptions, opt_cfg, "zero_optimization.offload_optimizer"),
            optimizer=optimizer,
            aio=aio,
        )
        self.units = self._build_units(model)
        self._check_sizes()
        # the stepper reads each unit's host gradient buffer in place: no buffer of its own
        parts = [_Part(u.index, 0, self._flat_values(u), host_grad=u.grad) for u in self.units]
        self.stepper.setup(parts, self.group_options)
        for p in parts:
            p.master = torch.empty(p.master.numel(), device="meta")
        self._resident: OrderedDict[int, _Unit] = OrderedDict()  # LRU of device copies
        self._cpu_cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # NVMe: max_in_cpu
        self._order: list[int] = []  # units in first-forward order (prefetch plan)
        self._recording = True
        self._aio = AsyncIO.from_config(aio) if config.device is OffloadDevice.nvme else None
        # NVMe: DeepSpeed's host buffer pool of buffer_size elements each. A unit larger than a
        # buffer is read in buffer-sized pieces, two buffers alternating so that the read of the
        # next piece runs while the current one is copied to the device.
        self._chunk = _chunk_elements(config.buffer_size, max(u.numel for u in self.units))
        self._staging = [
            aligned_empty(self._chunk, torch.float32, pin=config.pin_memory)
            for _ in range(2 if self._aio else 0)
        ]
        for u in self.units:
            for p in u.params:
                p.data = torch.empty(0, device=self.device, dtype=p.dtype)
        self._install_hooks()

    # ------------------------------------------------------------------ construction
    def _build_units(self, model: nn.Module) -> list[_Unit]:
        mods = find_units(model)
        taken: set[int] = set()
        groups: list[tuple[nn.Module, list[nn.Parameter]]] = []
        for m in mods:
            ps = [p for p in m.parameters() if id(p) not in taken]
            taken.update(id(p) for p in ps)
            groups.append((m, ps))
        rest = [p for p in model.parameters() if id(p) not in taken]
        groups.append((model, rest))
        units = []
        for i, (m, ps) in enumerate(groups):
            if not ps:
                continue
            for p in ps:
                if p.dtype != torch.float32:
                    raise ValueError(
                        "ParamOffloader: parameters must be float32 (the offloaded copy is the fp32 "
                        f"master); got {p.dtype} in {type(m).__name__}"
                    )
            offsets, off = [], 0
            for p in ps:
                offsets.append(off)
                off += p.numel()
            grad = aligned_empty(off, torch.float32, pin=self.config.pin_memory)
            unit = _Unit(len(units), m, ps, off, offsets, [p.shape for p in ps], grad)
            unit.fresh = set(range(len(ps)))
            units.append(unit)
            del i
        return units

    def _check_sizes(self) -> None:
        # buffer_size is not a limit on units or parameters: NVMe reads go through the host
        # buffers in pieces (DeepSpeed: "size of buffers in buffer pool for parameter offloading
        # to NVMe"; ignored with device cpu). buffer_count also bounds the device copies here.
        if self.config.buffer_count < 3:
            raise ValueError(
                "zero_optimization.offload_param.buffer_count must be >= 3 (the root's parameters, "
                f"the running unit and the prefetched one), got {self.config.buffer_count}"
            )

    @staticmethod
    def _flat_values(u: _Unit) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).cpu() for p in u.params])

    # ------------------------------------------------------------------ fetch / release
    def _load(self, u: _Unit, dst: torch.Tensor) -> None:
        """Fill ``dst`` (the unit's device buffer) with the unit's fp32 values from the store."""
        store = self.stepper.store
        if isinstance(store, CpuStore):
            dst.copy_(store.state[u.index]["master"])
            return
        cached = self._cpu_cache.get(u.index)
        if cached is not None:
            self._cpu_cache.move_to_end(u.index)
            dst.copy_(cached)
            return
        assert isinstance(store, NvmeStore) and self._aio is not None
        path = store.files[u.index]  # the master region starts at offset 0
        if 0 < u.numel <= self.config.max_in_cpu:
            # kept in CPU memory until the next step (max_in_cpu elements in all, LRU)
            used = sum(t.numel() for t in self._cpu_cache.values())
            while self._cpu_cache and used + u.numel > self.config.max_in_cpu:
                used -= self._cpu_cache.popitem(last=False)[1].numel()
            host = aligned_empty(u.numel, torch.float32, pin=self.config.pin_memory)
            self._aio.pread(host, path)
            self._cpu_cache[u.index] = host
            dst.copy_(host)
            return
        pieces = [(lo, min(lo + self._chunk, u.numel)) for lo in range(0, u.numel, self._chunk)]
        for k, (lo, hi) in enumerate(pieces):
            if k == 0:
                self._aio.pread(self._staging[0][: hi - lo], path, lo * 4, async_op=True)
            self._aio.wait()  # piece k has landed (errors name the swap file)
            if k + 1 < len(pieces):
                nlo, nhi = pieces[k + 1]
                buf = self._staging[(k + 1) % 2][: nhi - nlo]
                self._aio.pread(buf, path, nlo * 4, async_op=True)
            # synchronous copy: the buffer is refilled two pieces later, after this returns
            dst[lo:hi].copy_(self._staging[k % 2][: hi - lo])

    def _fetch(self, u: _Unit, active: bool) -> None:
        if u.state is UnitState.OFFLOADED:
            self._make_room()
            buf = torch.empty(u.numel, dtype=torch.float32, device=self.device)
            self._load(u, buf)
            u.buffer = buf
            for p, off, shape in zip(u.params, u.offsets, u.shapes):
                p.data = buf[off : off + shape.numel()].view(shape)
            u.state = UnitState.RESIDENT
        self._resident[u.index] = u
        self._resident.move_to_end(u.index)
        if active:
            u.state = UnitState.ACTIVE

    def _make_room(self) -> None:
        while len(self._resident) >= self.config.buffer_count:
            victim = next(
                (v for v in self._resident.values() if v.state is UnitState.RESIDENT), None
            )
            if victim is None:
                raise RuntimeError(
                    f"ParamOffloader: all {self.config.buffer_count} device buffers hold units in "
                    "use; raise zero_optimization.offload_param.buffer_count"
                )
            self._evict(victim)

    def _evict(self, u: _Unit) -> None:
        for p in u.params:
            p.data = torch.empty(0, device=self.device, dtype=p.dtype)
        u.buffer = None
        u.state = UnitState.OFFLOADED
        self._resident.pop(u.index, None)

    def _deactivate(self, u: _Unit) -> None:
        if u.state is UnitState.ACTIVE:
            u.state = UnitState.RESIDENT

    def _prefetch_after(self, u: _Unit, direction: int) -> None:
        if self._recording or u.index not in self._order:
            return
        pos = self._order.index(u.index) + direction
        if 0 <= pos < len(self._order):
            nxt = self.units[self._order[pos]]
            if nxt.state is UnitState.OFFLOADED and len(self._resident) < self.config.buffer_count:
                self._fetch(nxt, active=False)

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        for u in self.units:
            u.module.register_forward_pre_hook(self._make_pre_forward(u))
            u.module.register_forward_hook(self._make_post_forward(u))
            u.module.register_full_backward_pre_hook(self._make_pre_backward(u))
            for j, p in enumerate(u.params):
                p.register_post_accumulate_grad_hook(self._make_grad_hook(u, j))

    def _make_pre_forward(self, u: _Unit):
        def hook(module: nn.Module, args: Any) -> None:
            if self._recording and u.index not in self._order:
                self._order.append(u.index)
            self._fetch(u, active=True)
            self._prefetch_after(u, +1)

        return hook

    def _make_post_forward(self, u: _Unit):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self._deactivate(u)
            if torch.is_grad_enabled():
                u.pending = set(range(len(u.params)))

        return hook

    def _make_pre_backward(self, u: _Unit):
        def hook(module: nn.Module, grad_out: Any) -> None:
            self._fetch(u, active=True)
            self._prefetch_after(u, -1)
            Variable._execution_engine.queue_callback(self._end_backward)

        return hook

    def _make_grad_hook(self, u: _Unit, j: int):
        def hook(p: torch.Tensor) -> None:
            assert p.grad is not None
            off = u.offsets[j]
            slot = u.grad[off : off + u.shapes[j].numel()]
            src = p.grad.reshape(-1).to("cpu", torch.float32)
            if j in u.fresh:
                # 0 + g, as adding into a zeroed slot would give (-0.0 becomes +0.0), in
                # one pass that does not read the slot
                torch.add(src, 0.0, out=slot)
                u.fresh.discard(j)
            else:
                slot.add_(src)
            p.grad = None
            u.pending.discard(j)
            if not u.pending:
                self._deactivate(u)

        return hook

    def _end_backward(self) -> None:
        for u in self.units:
            self._deactivate(u)
            u.pending.clear()
        self._recording = False

    # ------------------------------------------------------------------ optimizer
    @torch.no_grad()
    def step(self) -> None:
        """CPU Adam over every unit with the accumulated host gradients (read in place by the
        stepper); device copies are dropped (the next forward fetches updated values). The
        next step's first gradient of each parameter overwrites its slot: no zeroing pass."""
        for u in list(self._resident.values()):
            self._evict(u)
        self._cpu_cache.clear()
        for u in self.units:
            for j in u.fresh:  # no gradient this step: zeros
                u.grad[u.offsets[j] : u.offsets[j] + u.shapes[j].numel()].zero_()
        self.stepper.step([u.grad for u in self.units])
        for u in self.units:
            u.fresh = set(range(len(u.params)))

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """fp32 values of every parameter by name (read from the store)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out: dict[str, torch.Tensor] = {}
        for u in self.units:
            values = self.stepper.state_tensors(u.index)["master"]
            for p, off, shape in zip(u.params, u.offsets, u.shapes):
                out[names[id(p)]] = values[off : off + shape.numel()].view(shape).clone()
        return out

    def close(self) -> None:
        if self._aio is not None:
            self._aio.close()
        self.stepper.close()
