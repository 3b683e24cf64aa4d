"""``OffloadStepper``: ZeRO's optimizer-state placement on the CPU or NVMe (ZeRO-Offload).

It implements ds_zero's ``PartitionStepper`` protocol structurally (ds_offload does not import
ds_zero): ``setup(partitions, group_options)``, ``grad_ready(index, grad)``, ``step(grads)``,
``state_tensors(index)``, ``state_loaded()`` and the attribute ``masters_on_device``.

One step, per offloaded partition, in order: its reduced gradient is copied to a pinned host
buffer on a side stream (all copies are queued first, so they run while the CPU works on earlier
partitions); the CPU Adam of ds_kernels updates the fp32 master and states in one pass and writes
the compute-dtype result into a pinned buffer; that buffer is copied back into the partition's
parameter shard on another side stream while the CPU moves on to the next partition. With NVMe,
the partition's state is read ahead and written back behind the update (see ``_state``).

``ratio`` < 1 keeps the last partitions (by element count) on the device, updated there by
torch's AdamW: partial offload trades device memory for CPU time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ds_offload._coerce import coerce
from ds_offload._copies import Copier
from ds_offload._hparams import check_kind, read_hparams
from ds_offload._options import AioOptions, OffloadDevice, OffloadOptimizerOptions
from ds_offload._pinned import aligned_empty
from ds_offload._state import CpuStore, NvmeStore, SplitStore
from ds_offload._threads import cpu_optimizer_threads


class _Partition(Protocol):
    """ds_zero.MasterPartition, structurally."""

    index: int
    group_index: int
    master: torch.Tensor
    param_shard: torch.Tensor | None
    # ds_zero >= 0.1.3: set where a parameter-shard store holds the compute-dtype shard (the
    # updated fp32 values are handed to it); read with getattr: older partitions lack it


def _writer(part: _Partition) -> Callable[[torch.Tensor], None] | None:
    return getattr(part, "param_writer", None)


class Phase(enum.Enum):
    """Where the stepper is within one optimizer step."""

    IDLE = "idle"  # between steps: host grad buffers hold nothing of value
    GRADS_ARRIVING = "grads_arriving"  # grad_ready calls are copying gradients to the host


class OffloadStepper:
    """Optimizer state of ZeRO's fp32 partitions held on the CPU or NVMe, stepped by CPU Adam.

    config: an ``offload_optimizer`` section (dict, pydantic model or options: device cpu|nvme, nvme_path,
        pin_memory, ratio, buffer_count, ...).
    optimizer: "adamw" (decoupled weight decay) or "adam" (L2); a group option
        ``decoupled_weight_decay`` overrides it per group.
    aio: the ``aio`` section used for NVMe swapping.
    defaults: hyper-parameters for keys the group options lack (lr, betas, eps, weight_decay).
    num_threads: CPU Adam threads (0: the section's ``num_threads``, and where that is 0 too,
        this process's share of the cores: ``cpu_optimizer_threads``).
    grad_buffers: host buffers (each the size of the largest partition) that the gradients'
        device-to-host copies rotate through, ``grad_buffers`` partitions ahead of the CPU Adam;
        0, or where they would not be smaller than one buffer per partition: one per partition.
        A copy is much faster than the Adam of its partition, so a few buffers hide it fully,
        and the host holds 4 bytes per parameter less than with one buffer per partition.
    """

    masters_on_device = False
    accepts_grad_scale = True

    def __init__(
        self,
        config: Any = None,
        *,
        optimizer: str = "adamw",
        aio: Any = None,
        defaults: dict[str, Any] | None = None,
        num_threads: int = 0,
        grad_buffers: int = 4,
    ) -> None:
        if grad_buffers < 0:
            raise ValueError(f"OffloadStepper: grad_buffers must be >= 0, got {grad_buffers}")
        config = coerce(
            OffloadOptimizerOptions,
            config if config is not None else {"device": "cpu"},
            "zero_optimization.offload_optimizer",
        )
        if not config.enabled:
            raise ValueError(
                "OffloadStepper: zero_optimization.offload_optimizer.device is 'none'; set it to "
                "'cpu' or 'nvme' (or do not use an offload stepper)"
            )
        self.config: OffloadOptimizerOptions = config
        self.aio_config: AioOptions = coerce(AioOptions, aio, "aio")
        self.kind = check_kind(optimizer)
        self.defaults = dict(defaults or {})
        self.num_threads: int = cpu_optimizer_threads(num_threads or config.num_threads)
        self.partitions: list[_Partition] = []
        self.group_options: Sequence[dict[str, Any]] = []
        self.offloaded: list[int] = []  # partition indices stepped on the CPU
        self.on_device: list[int] = []  # partition indices kept on the device (ratio < 1)
        self.steps: dict[int, torch.Tensor] = {}  # per partition, 1-element fp32 step count
        self.store: CpuStore | NvmeStore | SplitStore
        self.grad_buffers = grad_buffers
        self._grad_host: dict[int, torch.Tensor] = {}  # one per partition (no pool)
        self._grad_pool: list[torch.Tensor] = []  # or the rotating buffers
        # early copies of this step (grad_ready(early_copy=True)), in arrival order
        self._arrived: list[int] = []
        self._arrived_set: set[int] = set()
        self._offloaded_set: set[int] = set()
        self._order: list[int] = []  # update order of the last step (prefetch plan)
        self._prefetched: list[int] | None = None
        self._lp_host: dict[int, torch.Tensor] = {}
        self._staging_bytes = 0  # of the _lp_host buffers this stepper allocated
        self._grad_events: dict[int, Any] = {}
        self._device_optim: torch.optim.Optimizer | None = None
        self._copier: Copier | None = None
        self._phase = Phase.IDLE
        self._op: Any = None

    # ------------------------------------------------------------------ setup
    def setup(
        self, partitions: Sequence[_Partition], group_options: Sequence[dict[str, Any]]
    ) -> None:
        from ds_kernels import load

        self._op = load("cpu_optim")
        self.partitions = list(partitions)
        self.group_options = group_options
        for part in self.partitions:
            if part.group_index >= len(group_options):
                raise ValueError(
                    f"OffloadStepper.setup: partition {part.index} is in param group "
                    f"{part.group_index} but only {len(group_options)} group options were given"
                )
            read_hparams(self.kind, group_options[part.group_index], self.defaults)  # validate
        devices = {p.master.device for p in self.partitions}
        if len(devices) > 1:
            raise ValueError(f"OffloadStepper: partitions live on several devices: {devices}")
        self._copier = Copier(next(iter(devices)) if devices else torch.device("cpu"))
        self._split_by_ratio()
        self._offloaded_set = set(self.offloaded)
        self._order = list(self.offloaded)
        pin = self.config.pin_memory
        if self.config.device is OffloadDevice.nvme:
            nvme = NvmeStore(self.config.nvme_path, self.config.buffer_count, pin, self.aio_config)  # type: ignore[arg-type]
            self.store = (
                SplitStore(CpuStore(pin), nvme, self.config.max_in_cpu)
                if self.config.max_in_cpu
                else nvme
            )
        else:
            self.store = CpuStore(pin)
        by_index = {p.index: p for p in self.partitions}
        sizes = [by_index[i].master.numel() for i in self.offloaded]
        pool = min(self.grad_buffers, len(sizes))
        if pool and pool * max(sizes) < sum(sizes):
            self._grad_pool = [
                aligned_empty(max(sizes), torch.float32, pin=pin) for _ in range(pool)
            ]
        for i in self.offloaded:
            part = by_index[i]
            # the store copies from the master itself (device or host): no intermediate host
            # copy, and an NVMe store reads it only when writing the swap file at finish_setup
            # (holding host copies of every partition until then would need 4 bytes per
            # parameter of host memory that NVMe offload exists to save)
            self.store.add(i, part.master.detach().reshape(-1))
            n = part.master.numel()
            if not self._grad_pool:
                self._grad_host[i] = aligned_empty(n, torch.float32, pin=pin)
            shard = part.param_shard
            if shard is not None and shard.dtype in (torch.bfloat16, torch.float16):
                if shard.device.type == "cpu" and shard.is_contiguous():
                    # a host shard (stage 3 parameter offload): CPU Adam writes the rounded
                    # values into it directly; a staging copy would be 2 more bytes per
                    # parameter of host memory and one more pass over them
                    self._lp_host[i] = shard.reshape(-1)
                else:
                    self._lp_host[i] = aligned_empty(n, shard.dtype, pin=pin)
                    self._staging_bytes += n * shard.element_size()
        if self._swaps:
            # may fail (full disk, IO error): before any device master is freed below, so a
            # failed setup leaves ZeRO's masters as they were (nothing lost, retry possible)
            self.store.finish_setup()
        for i in self.offloaded:
            part = by_index[i]
            has_shard = part.param_shard is not None or _writer(part) is not None
            if has_shard and _sole_owner(part.master):
                # the host copy is the master from now on; the device copy would be 4 bytes per
                # parameter of dead memory (ZeRO reads masters through state_tensors, see
                # masters_on_device). Not when shard is None: then the master is the parameter
                # storage itself; not when the master is a view sharing its storage.
                part.master.untyped_storage().resize_(0)
        for part in self.partitions:
            self.steps[part.index] = torch.zeros(1, dtype=torch.float32)
        self._setup_device_optimizer(by_index)

    def _split_by_ratio(self) -> None:
        total = sum(p.master.numel() for p in self.partitions)
        budget = self.config.ratio * total
        done = 0
        self.offloaded, self.on_device = [], []
        for part in self.partitions:
            n = part.master.numel()
            # offload a partition while at least half of it fits in the remaining budget
            if done + n / 2 <= budget and self.config.ratio > 0:
                self.offloaded.append(part.index)
                done += n
            else:
                self.on_device.append(part.index)

    def _setup_device_optimizer(self, by_index: dict[int, _Partition]) -> None:
        if not self.on_device:
            return
        groups: dict[int, list[torch.Tensor]] = {}
        for i in self.on_device:
            groups.setdefault(by_index[i].group_index, []).append(by_index[i].master)
        param_groups = [{"params": ps, "_gi": gi} for gi, ps in groups.items()]
        opt = torch.optim.AdamW(param_groups, lr=1e-3)
        for i in self.on_device:
            # state made now so that the step counter is shared with ``self.steps``
            master = by_index[i].master
            opt.state[master] = {
                "step": self.steps[i].view(()),
                "exp_avg": torch.zeros_like(master),
                "exp_avg_sq": torch.zeros_like(master),
            }
        self._device_optim = opt

    @property
    def _swaps(self) -> bool:
        """Some partitions' state is in swap files (reads to prefetch, writes to flush)."""
        return isinstance(self.store, (NvmeStore, SplitStore))

    # ------------------------------------------------------------------ per step
    def grad_ready(self, index: int, grad: torch.Tensor, early_copy: bool = False) -> None:
        """Called as partition ``index``'s reduced gradient is final. With ``early_copy`` (a
        caller that will pass ``grad_scale`` to ``step`` instead of scaling gradients in place,
        and call ``skip_step`` when it skips one) the device-to-host copy starts now,
        overlapping the rest of backward: into the partition's own buffer, or with the
        rotating pool into the next free one (the first ``grad_buffers`` arrivals; the step
        then updates partitions in arrival order, the others as buffers free up)."""
        if self._phase is Phase.IDLE and self._swaps:
            # NVMe reads overlap the rest of backward, in the order the last step used
            self.store.prefetch(self._order)
            self._prefetched = list(self._order)
        self._phase = Phase.GRADS_ARRIVING
        if not early_copy or index not in self._offloaded_set or index in self._arrived_set:
            return
        assert self._copier is not None
        self._arrived.append(index)
        self._arrived_set.add(index)
        pos = len(self._arrived) - 1  # its place in the step's update order
        if not self._grad_pool or pos < len(self._grad_pool):
            dst = self._grad_buffer(pos, index, grad.numel())
            self._grad_events[index] = self._copier.to_host(dst, grad)

    def _grad_buffer(self, pos: int, index: int, numel: int) -> torch.Tensor:
        """The host buffer of the gradient updated ``pos``-th in a step (partition ``index``):
        its own buffer, or with the pool the rotating one of that place."""
        if self._grad_pool:
            return self._grad_pool[pos % len(self._grad_pool)][:numel]
        return self._grad_host[index]

    def skip_step(self) -> None:
        """The caller skips this step (fp16 overflow): forget copies started by grad_ready."""
        if self._copier is not None:
            for event in self._grad_events.values():
                self._copier.wait(event)  # the buffers are reused by the next step's copies
        self._grad_events.clear()
        self._arrived.clear()
        self._arrived_set.clear()
        if self._swaps:
            self.store.flush()
        self._phase = Phase.IDLE

    @torch.no_grad()
    def step(
        self, grads: Sequence[torch.Tensor], grad_scale: float | torch.Tensor | None = None
    ) -> None:
        """Update every partition with its final gradient (same order as the partitions) and
        write the results into ``param_shard`` (or into ``master`` where ``param_shard`` is
        None). ``grad_scale``: a factor the gradients still need (unscale and clip), applied on
        the host; with it, copies started by ``grad_ready(early_copy=True)`` are reused."""
        if len(grads) != len(self.partitions):
            raise ValueError(
                f"OffloadStepper.step: got {len(grads)} gradients for {len(self.partitions)} "
                "partitions (pass one per partition, in partition order)"
            )
        assert self._copier is not None
        copier = self._copier
        by_index = {p.index: (p, g) for p, g in zip(self.partitions, grads)}
        for i in self.offloaded:
            part, g = by_index[i]
            if g.numel() != part.master.numel():
                raise ValueError(
                    f"OffloadStepper.step: gradient {i} has {g.numel()} elements, its partition "
                    f"{part.master.numel()}"
                )
        scale = None if grad_scale is None else float(grad_scale)
        pool = self._grad_pool
        if scale is None:
            # the caller scaled the gradients in place after any early copy: copy them again
            for event in self._grad_events.values():
                copier.wait(event)
            self._grad_events.clear()
            self._arrived.clear()
            self._arrived_set.clear()
        # partitions whose copies started in backward first (in arrival order), then the rest
        order = self._arrived + [i for i in self.offloaded if i not in self._arrived_set]
        self._order = order

        def host_grad(pos: int) -> torch.Tensor:
            i = order[pos]
            return self._grad_buffer(pos, i, by_index[i][1].numel())

        def queue_copy(pos: int) -> None:
            i = order[pos]
            self._grad_events[i] = copier.to_host(host_grad(pos), by_index[i][1])

        # 1. queue the gradient copies not started by grad_ready: every one, or with the pool
        # as many as it has buffers (each later one when its buffer's Adam is done)
        for pos, i in enumerate(order):
            if pool and pos >= len(pool):
                break
            if i not in self._grad_events:
                queue_copy(pos)
        if self._swaps and (self._phase is Phase.IDLE or self._prefetched != order):
            self.store.prefetch(order)  # the NVMe reads in the order of the updates
        # 2. device-resident partitions (ratio < 1) step on the device meanwhile
        self._step_on_device(by_index, scale)
        # 3. CPU Adam per partition as its gradient lands; results stream back
        try:
            for pos, i in enumerate(order):
                part = by_index[i][0]
                copier.wait(self._grad_events.pop(i))
                state = self.store.acquire(i)
                # the unscale x clip factor is applied inside CPU Adam's pass over the state
                self._cpu_adam(part, state, host_grad(pos), 1.0 if scale is None else scale)
                if pool and pos + len(pool) < len(order):
                    queue_copy(pos + len(pool))  # the buffer is free: Adam has consumed it
                self._write_back(part, state)
                self.store.release(i)
            self.store.flush()
        finally:
            self._grad_events.clear()
            self._arrived.clear()
            self._arrived_set.clear()
            self._prefetched = None
            self._phase = Phase.IDLE
        copier.finish()

    def _cpu_adam(
        self,
        part: _Partition,
        state: dict[str, torch.Tensor],
        grad: torch.Tensor,
        grad_scale: float = 1.0,
    ) -> None:
        h = read_hparams(self.kind, self.group_options[part.group_index], self.defaults)
        step = self.steps[part.index]
        step += 1
        bc1, bc2 = h.bias_corrections(int(step.item()))
        lp = self._lp_host.get(part.index)
        self._op.adam(
            [state["master"]], [grad], [state["exp_avg"]], [state["exp_avg_sq"]],
            [lp] if lp is not None else None,
            lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay,
            decoupled=h.decoupled, bias_correction1=[bc1], bias_correction2_sqrt=[bc2],
            num_threads=self.num_threads, grad_scale=grad_scale,
        )  # fmt: skip

    def _write_back(self, part: _Partition, state: dict[str, torch.Tensor]) -> None:
        assert self._copier is not None
        lp = self._lp_host.get(part.index)
        writer = _writer(part)
        if writer is not None:
            writer(state["master"])  # copies before returning: the NVMe slot may be reused next
            return
        if part.param_shard is None and part.master.is_meta:
            return  # the store is the only copy (parameter offload reads parameters from it)
        if part.param_shard is not None:
            dst = part.param_shard.reshape(-1)
            src = lp if lp is not None else state["master"]
            if src.data_ptr() == dst.data_ptr():
                return  # CPU Adam wrote into the host shard itself
        else:
            # fp32 stages 0-2: ZeRO's master is the parameter storage itself
            dst, src = part.master.reshape(-1), state["master"]
        if self.store.swapped(part.index) and not self._copier.is_cpu and lp is None:
            # the NVMe slot buffer is reused right after: copy synchronously from it
            dst.copy_(src)
        else:
            self._copier.to_device(dst, src)

    def _step_on_device(
        self, by_index: dict[int, tuple[_Partition, torch.Tensor]], scale: float | None
    ) -> None:
        opt = self._device_optim
        if opt is None:
            return
        for g in opt.param_groups:
            h = read_hparams(self.kind, self.group_options[g["_gi"]], self.defaults)
            g.update(lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)
            if not h.decoupled and h.weight_decay:
                raise ValueError("ratio < 1 supports AdamW only (decoupled weight decay)")
        for i in self.on_device:
            part, grad = by_index[i]
            part.master.grad = grad if scale is None else grad * scale
        opt.step()
        for i in self.on_device:
            part, _ = by_index[i]
            part.master.grad = None
            writer = _writer(part)
            if writer is not None:
                writer(part.master.reshape(-1))
            elif part.param_shard is not None:
                part.param_shard.reshape(-1).copy_(part.master.reshape(-1))

    def host_memory(self) -> dict[str, int]:
        """Bytes this stepper holds, by place: optimizer state in host memory and on NVMe, the
        NVMe swap buffers, gradient buffers and low-precision staging buffers (for the engine's
        one-line offload summary)."""
        sizes = {p.index: p.master.numel() * 12 for p in self.partitions}  # master + 2 moments
        on_nvme = sum(sizes[i] for i in self.offloaded if self.store.swapped(i))
        nvme = self.store.nvme if isinstance(self.store, SplitStore) else self.store
        swap_buffers = [slot.buffer for slot in getattr(nvme, "slots", [])]
        grads = [*self._grad_pool, *self._grad_host.values()]
        return {
            "optimizer_state_host": sum(sizes[i] for i in self.offloaded) - on_nvme,
            "optimizer_state_nvme": on_nvme,
            "optimizer_swap_buffers": sum(t.numel() * t.element_size() for t in swap_buffers),
            "gradient_buffers": sum(t.numel() * t.element_size() for t in grads),
            "staging_buffers": self._staging_bytes,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Live tensors: "master", "exp_avg", "exp_avg_sq" (the master's numel) and "step"
        (1 element). Fill them in place, then call ``state_loaded``."""
        if index in self.on_device:
            part = next(p for p in self.partitions if p.index == index)
            assert self._device_optim is not None
            st = self._device_optim.state[part.master]
            return {
                "master": part.master,
                "exp_avg": st["exp_avg"],
                "exp_avg_sq": st["exp_avg_sq"],
                "step": self.steps[index],
            }
        return {**self.store.tensors(index), "step": self.steps[index]}

    @torch.no_grad()
    def state_loaded(self) -> None:
        """Checkpoint data was written into ``state_tensors``: refresh parameters from it."""
        for part in self.partitions:
            if part.index in self.offloaded:
                master = self.store.tensors(part.index)["master"]
            else:
                master = part.master.reshape(-1)
            writer = _writer(part)
            if writer is not None:
                writer(master)
                continue
            dst = part.param_shard if part.param_shard is not None else part.master
            if not dst.is_meta and dst.data_ptr() != master.data_ptr():
                dst.reshape(-1).copy_(master)
        self.store.loaded()

    def close(self) -> None:
        """Release host buffers and remove NVMe swap files."""
        self.store.close()


def _sole_owner(t: torch.Tensor) -> bool:
    """True when ``t`` spans its whole storage (freeing that storage frees nothing else)."""
    return (
        not t.is_meta
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
