"""``OffloadStepper``: ZeRO's optimizer-state placement on the CPU or NVMe (ZeRO-Offload).

It implements ds_zero's ``PartitionStepper`` protocol structurally (ds_offload does not import
ds_zero): ``setup(partitions, group_options)``, ``grad_ready(index, grad)``, ``step(grads)``,
``state_tensors(index)``, ``state_loaded()`` and the attribute ``masters_on_device``; and its
streaming extensions: ``accepts_grad_scale`` (``grad_ready(early_copy=)``, ``step(grad_scale=)``,
``skip_step``) and ``overlaps_step`` (``step(wait=False)``, ``wait_partition``,
``partition_ready``, ``prefer_order``, ``synchronize``).

One step, per offloaded partition, in update order: its reduced gradient is copied to a pinned
host buffer on a side stream (started during backward where the caller streams them); the CPU
Adam of ds_kernels updates the fp32 master and states in one pass and writes the compute-dtype
result into a pinned buffer (or a host parameter shard); that buffer is copied back into the
partition's parameter shard on another side stream while the CPU moves on. With ``overlap``
(default) this runs on a worker thread and ``step(wait=False)`` returns at once: the caller's
next forward waits, partition by partition, only for the values it reads (``wait_partition``),
so the update of the last layers overlaps the forward of the first ones; the arithmetic is the
same. With ``delayed_update`` the update of step N runs during step N+1's forward/backward and
its values are published at step N+1 (a one-step-stale gradient: different math).

``ratio`` < 1 keeps the first partitions in model order on the device (twin-flow, see
``_twin``), stepped there by a fused optimizer while the CPU steps the others.
"""

from __future__ import annotations

import enum
import queue
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ds_accel import CPUAccelerator
from ds_offload._coerce import coerce
from ds_offload._copies import Copier
from ds_offload._hparams import AdamHparams, check_kind, read_hparams
from ds_offload._options import AioOptions, OffloadDevice, OffloadOptimizerOptions
from ds_offload._pinned import aligned_empty
from ds_offload._state import CpuStore, NvmeStore, SplitStore
from ds_offload._threads import cpu_optimizer_threads
from ds_offload._twin import DeviceFlow, model_order, resolve_ratio, split
from ds_offload._worker import JobState, UpdateJob, UpdateWorker


class _Partition(Protocol):
    """ds_zero.MasterPartition, structurally."""

    index: int
    group_index: int
    master: torch.Tensor
    param_shard: torch.Tensor | None
    # ds_zero >= 0.1.3: set where a parameter-shard store holds the compute-dtype shard (the
    # updated fp32 values are handed to it); read with getattr: older partitions lack it
    # ds_zero >= 0.1.5: ``grad_dtype``, the 16-bit dtype in which the caller can hand over the
    # gradient exactly (float32 otherwise); read with getattr too
    # ``host_grad`` (optional, read with getattr): a contiguous host tensor the caller fills
    # with the partition's gradient itself and passes to ``step``; it is this stepper's
    # gradient buffer for the partition (read in place: no copy, no buffer of its own)


def _exact_grad_dtype(part: _Partition) -> torch.dtype:
    dtype = getattr(part, "grad_dtype", torch.float32)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _writer(part: _Partition) -> Callable[[torch.Tensor], None] | None:
    return getattr(part, "param_writer", None)


class Phase(enum.Enum):
    """Where the stepper is within one optimizer step."""

    IDLE = "idle"  # between steps: host grad buffers hold nothing of value
    GRADS_ARRIVING = "grads_arriving"  # grad_ready calls are copying gradients to the host
    UPDATING = "updating"  # step() returned; the worker thread is still updating partitions


def host_available_bytes() -> int:
    """Host memory available to new allocations without swapping (ds_accel's CPU accelerator's
    ``available_memory``: ``MemAvailable`` where the kernel reports it), whatever the active
    accelerator is: it sizes the host gradient buffers."""
    return CPUAccelerator().available_memory()


class OffloadStepper:
    """Optimizer state of ZeRO's fp32 partitions held on the CPU or NVMe, stepped by CPU Adam.

    config: an ``offload_optimizer`` section (dict, pydantic model or options: device cpu|nvme,
        nvme_path, pin_memory, ratio, buffer_count, overlap, delayed_update, ...).
    optimizer: "adamw" (decoupled weight decay) or "adam" (L2); a group option
        ``decoupled_weight_decay`` overrides it per group.
    aio: the ``aio`` section used for NVMe swapping.
    defaults: hyper-parameters for keys the group options lack (lr, betas, eps, weight_decay).
    num_threads: CPU Adam threads (0: the section's ``num_threads``, and where that is 0 too,
        this process's share of the cores: ``cpu_optimizer_threads``; with ``super_offload``,
        ``cpuadam_cores_perc`` of that share).
    grad_buffers: host buffers (each the size of the largest partition) that the gradients'
        device-to-host copies rotate through, ``grad_buffers`` partitions ahead of the CPU Adam;
        0, or where they would not be smaller than one buffer per partition: one per partition.
        A copy is much faster than the Adam of its partition, so a few buffers hide it fully,
        and the host holds 4 bytes per parameter less than with one buffer per partition; but
        a gradient that found no free buffer waits for its copy on the device until the step,
        so the device holds up to 4 bytes per parameter more at the end of backward. None
        (default): one buffer per partition, as DeepSpeed, unless the host lacks room for them
        (with this stepper's own state they would take more than ``HOST_SHARE`` of the host
        memory available at setup, or the store is NVMe), then 4 rotating buffers.
        ``delayed_update`` always uses one buffer per partition (the next step's gradients
        arrive while the previous update still reads its own).
    """

    #: the share of the host memory available at setup that the optimizer state plus one
    #: gradient buffer per partition may take before ``grad_buffers=None`` picks the pool
    HOST_SHARE = 2 / 3
    #: the pool's size when ``grad_buffers=None`` picks it
    POOL_BUFFERS = 4

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
        grad_buffers: int | None = None,
    ) -> None:
        if grad_buffers is not None and grad_buffers < 0:
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
        threads = num_threads or config.num_threads
        if not threads and config.super_offload:
            # SuperOffload's cpuadam_cores_perc: the rest of the cores stay with PyTorch
            threads = max(1, int(config.cpuadam_cores_perc * cpu_optimizer_threads(0)))
        self.delayed: bool = config.delayed_update
        # ds_zero (>= 0.1.4) reads this: it then calls step(wait=False) and waits per partition
        self.overlaps_step: bool = config.overlap or self.delayed
        auto = cpu_optimizer_threads(threads)
        if not threads and self.overlaps_step and auto > 2:
            # the caller's thread keeps launching the next forward's kernels meanwhile: leave
            # it a core (CPU Adam's result does not depend on its thread count)
            auto -= 1
        self.num_threads: int = auto
        self.partitions: list[_Partition] = []
        self.group_options: Sequence[dict[str, Any]] = []
        self.ratio: float = 1.0  # the offloaded fraction in use ("auto" resolved at setup)
        self.offloaded: list[int] = []  # partition indices stepped on the CPU
        self.on_device: list[int] = []  # partition indices kept on the device (ratio < 1)
        self.steps: dict[int, torch.Tensor] = {}  # per partition, 1-element fp32 step count
        self.store: CpuStore | NvmeStore | SplitStore
        # None: decided at setup, when the partition sizes are known
        self.grad_buffers: int | None = 0 if self.delayed else grad_buffers
        self._grad_host: dict[int, torch.Tensor] = {}  # one per partition (no pool)
        self._grad_pool: list[torch.Tensor] = []  # or the rotating buffers
        # per offloaded partition, the dtype of its host gradient buffer: the 16-bit dtype the
        # caller can hand the gradient over in exactly (MasterPartition.grad_dtype), else fp32
        self._grad_dtypes: dict[int, torch.dtype] = {}
        # fp32 host buffers of partitions whose gradient came in fp32 although their buffer is
        # 16-bit (a step that accumulated after all): made on demand, dropped when a 16-bit
        # gradient fills the partition's own buffer again
        self._grad_spill: dict[int, torch.Tensor] = {}
        # partitions whose host gradient buffer is the caller's (``host_grad``)
        self._adopted: set[int] = set()
        # early copies of this step (grad_ready(early_copy=True)), in arrival order
        self._arrived: list[int] = []
        self._arrived_set: set[int] = set()
        self._offloaded_set: set[int] = set()
        self._order: list[int] = []  # update order of the last step (prefetch plan)
        self._preferred: list[int] = []  # update order asked by the caller (the next forward's)
        self._prefetched: list[int] | None = None
        self._lp_host: dict[int, torch.Tensor] = {}
        self._staging_bytes = 0  # of the _lp_host / delayed staging buffers this stepper made
        self._grad_events: dict[int, Any] = {}
        self._device_flow: DeviceFlow | None = None
        self._copier: Copier | None = None
        self._phase = Phase.IDLE
        self._op: Any = None
        self._by_index: dict[int, _Partition] = {}
        self._worker: UpdateWorker | None = None
        self._job: UpdateJob | None = None  # the last step's CPU work (may still run)
        # delayed_update: compute-dtype results of the last update, not yet published
        self._delayed_out: dict[int, torch.Tensor] = {}
        self._staged: list[int] = []
        self._publish_events: dict[int, Any] = {}
        # gradients that need no factor (grad_ready(final=True)): the update of each partition
        # starts as soon as its gradient is on the host, during backward; the worker takes
        # (place, index, gradient not yet copied, event) items from this queue until None
        self.accepts_final_grads: bool = not self.delayed
        self._stream: queue.SimpleQueue[tuple[int, int, torch.Tensor | None, Any] | None] | None = (
            None
        )

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
        self.ratio = resolve_ratio(self.config.ratio, self.partitions)
        self.offloaded, self.on_device = split(self.partitions, self.ratio)
        self._offloaded_set = set(self.offloaded)
        by_index = {p.index: p for p in self.partitions}
        self._by_index = by_index
        # CPU updates in model order by default: the next forward needs the first layers first
        self._order = sorted(self.offloaded, key=lambda i: model_order(by_index[i]))
        if self.delayed and any(by_index[i].master.is_meta for i in self.offloaded):
            raise ValueError(
                "zero_optimization.offload_optimizer.delayed_update does not support parameters "
                "read from the optimizer store itself (ParamOffloader); remove delayed_update"
            )
        if self.delayed and any(_writer(by_index[i]) is not None for i in self.offloaded):
            raise ValueError(
                "zero_optimization.offload_optimizer.delayed_update does not support parameter "
                "shards in a parameter-shard store (offload_param device 'nvme'); use "
                "offload_param device 'cpu' or remove delayed_update"
            )
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
        sizes = [by_index[i].master.numel() for i in self.offloaded]
        self._grad_dtypes = {
            i: _exact_grad_dtype(by_index[i]) if self.config.exact_16bit_grads else torch.float32
            for i in self.offloaded
        }
        adopted = self._adopt_host_grads()
        if self.grad_buffers is None:
            self.grad_buffers = self._auto_grad_buffers(sizes)
        pool = min(self.grad_buffers, len(sizes))
        # the caller's own buffers already hold every gradient of those partitions: no pool
        if pool and not adopted and pool * max(sizes) < sum(sizes):
            # the pool's buffers serve every partition: 16-bit only if all take that dtype
            kinds = set(self._grad_dtypes.values())
            pool_dtype = kinds.pop() if len(kinds) == 1 else torch.float32
            self._grad_dtypes = dict.fromkeys(self.offloaded, pool_dtype)
            self._grad_pool = [aligned_empty(max(sizes), pool_dtype, pin=pin) for _ in range(pool)]
        for i in self.offloaded:
            part = by_index[i]
            # the store copies from the master itself (device or host): no intermediate host
            # copy, and an NVMe store reads it only when writing the swap file at finish_setup
            # (holding host copies of every partition until then would need 4 bytes per
            # parameter of host memory that NVMe offload exists to save)
            self.store.add(i, part.master.detach().reshape(-1))
            n = part.master.numel()
            if i in adopted:
                self._grad_host[i] = adopted[i]
            elif not self._grad_pool:
                self._grad_host[i] = aligned_empty(n, self._grad_dtypes[i], pin=pin)
            shard = part.param_shard
            if shard is not None and shard.dtype in (torch.bfloat16, torch.float16):
                if shard.device.type == "cpu" and shard.is_contiguous() and not self.delayed:
                    # a host shard (stage 3 parameter offload): CPU Adam writes the rounded
                    # values into it directly; a staging copy would be 2 more bytes per
                    # parameter of host memory and one more pass over them
                    self._lp_host[i] = shard.reshape(-1)
                else:
                    # delayed_update: the shard is read by the forward running during the
                    # update, so the update writes here and the values are published later
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
        if self.on_device:
            self._device_flow = DeviceFlow(
                [by_index[i] for i in self.on_device],
                self.group_options,
                self.kind,
                self.defaults,
                self.steps,
            )
        if self.overlaps_step and self.offloaded:
            copier = self._copier

            def on_start() -> None:
                copier.set_thread_device()
                torch.set_grad_enabled(False)  # grad mode is per thread

            self._worker = UpdateWorker("ds-offload-cpu-adam", on_start)
            # a stepper dropped without close() does not leave its thread waiting forever
            weakref.finalize(self, self._worker.stop)

    def _adopt_host_grads(self) -> dict[int, torch.Tensor]:
        """The caller's host gradient buffers (``host_grad``) of offloaded partitions, checked."""
        adopted: dict[int, torch.Tensor] = {}
        for i in self.offloaded:
            part = self._by_index[i]
            buf = getattr(part, "host_grad", None)
            if buf is None:
                continue
            n = part.master.numel()
            if buf.device.type != "cpu" or not buf.is_contiguous() or buf.numel() != n:
                raise ValueError(
                    f"OffloadStepper.setup: partition {i}'s host_grad must be a contiguous CPU "
                    f"tensor of {n} elements, got {tuple(buf.shape)} on {buf.device}"
                )
            if buf.dtype not in (torch.float32, self._grad_dtypes[i]):
                raise ValueError(
                    f"OffloadStepper.setup: partition {i}'s host_grad is {buf.dtype}; use float32"
                )
            self._grad_dtypes[i] = buf.dtype
            adopted[i] = buf.reshape(-1)
        self._adopted = set(adopted)
        return adopted

    @property
    def _swaps(self) -> bool:
        """Some partitions' state is in swap files (reads to prefetch, writes to flush)."""
        return isinstance(self.store, (NvmeStore, SplitStore))

    @property
    def _asynchronous(self) -> bool:
        """The CPU work may run on the worker thread while the caller goes on. Not where an
        updated partition is handed to a parameter-shard store (its writer is not safe to call
        while the caller's gathers read the store)."""
        return self._worker is not None and not any(
            _writer(self._by_index[i]) is not None for i in self.offloaded
        )

    # ------------------------------------------------------------------ overlap protocol
    def prefer_order(self, indices: Sequence[int]) -> None:
        """The caller's forward reads partitions in this order: the CPU updates them in it, so
        the next forward can start on the first ones while the CPU does the rest. Unknown or
        device-resident indices are ignored; the offloaded ones not listed go last."""
        self._finish_job()
        seen: set[int] = set()
        order = []
        for i in indices:
            if i in self._offloaded_set and i not in seen:
                seen.add(i)
                order.append(i)
        order += [i for i in self._order if i not in seen]
        self._preferred = order
        self._order = list(order)

    def partition_ready(self, index: int) -> bool:
        """True when partition ``index``'s updated values are in place (or on their way to the
        device behind an event that ``wait_partition`` hands to the caller's stream)."""
        job = self._job
        return job is None or job.is_published(index)

    def wait_partition(self, index: int) -> None:
        """Block until partition ``index``'s values of the last step are in place, and make the
        calling thread's current stream wait for their copy to the device."""
        job = self._job
        if job is None:
            return
        event = job.wait(index)
        if event is not None:
            assert self._copier is not None
            self._copier.stream_waits(event)

    def synchronize(self) -> None:
        """Block until the last step's CPU work is done and its copies are ordered before the
        current stream's later work. With ``delayed_update`` the last update's values stay
        staged until the next step publishes them (the masters hold them already)."""
        self._finish_job()

    def _finish_job(self) -> None:
        job = self._job
        if job is None:
            return
        if self._stream is not None:
            raise RuntimeError(
                "OffloadStepper: final gradients of this step are still arriving (grad_ready("
                "final=True)); call step() or skip_step() before reading the optimizer state"
            )
        self._job = None  # its error (if any) is raised once, here
        if self._phase is Phase.UPDATING:
            self._phase = Phase.IDLE
        job.wait_all()
        assert self._copier is not None
        for event in job.device_events.values():
            self._copier.stream_waits(event)

    def _auto_grad_buffers(self, sizes: list[int]) -> int:
        """``grad_buffers=None``: 0 (one host buffer per partition, no gradient waits on the
        device) where the host has room, else the pool."""
        if self.config.device is OffloadDevice.nvme:
            return self.POOL_BUFFERS  # host memory is what NVMe offload is for
        # fp32 master and two moments, plus one gradient buffer (fp32 or 16-bit), per parameter
        need = sum(n * (12 + self._grad_dtypes[i].itemsize) for i, n in zip(self.offloaded, sizes))
        if need <= self.HOST_SHARE * host_available_bytes():
            return 0
        return self.POOL_BUFFERS

    def _job_running(self) -> bool:
        return self._job is not None and self._job.state is not JobState.DONE

    # ------------------------------------------------------------------ per step
    def grad_ready(
        self, index: int, grad: torch.Tensor, early_copy: bool = False, final: bool = False
    ) -> None:
        """Called as partition ``index``'s reduced gradient is final. With ``early_copy`` (a
        caller that will pass ``grad_scale`` to ``step`` instead of scaling gradients in place,
        and call ``skip_step`` when it skips one) the device-to-host copy starts now,
        overlapping the rest of backward: into the partition's own buffer, or with the
        rotating pool into the buffer of its place in the update order when that place is
        among the first ``grad_buffers``. With ``final`` too (the caller will pass no factor
        but 1 and never skip this step: no clipping, no loss scaling) the partition's update
        starts on the worker thread as soon as its gradient is on the host, in arrival order,
        while backward goes on (the arithmetic is the same)."""
        if final and early_copy and self._streams(index):
            self._stream_grad(index, grad)
            return
        if self._phase is not Phase.GRADS_ARRIVING:
            if self.delayed:
                if self._job_running():
                    # the last update still reads the host gradient buffers: copy at step()
                    return
                self._finish_job()
            else:
                self._finish_job()  # normally done already: the forward waited for it
            if self._swaps:
                # NVMe reads overlap the rest of backward, in the order the last step used
                self.store.prefetch(self._order)
                self._prefetched = list(self._order)
            self._phase = Phase.GRADS_ARRIVING
        if not early_copy or index not in self._offloaded_set or index in self._arrived_set:
            return
        assert self._copier is not None
        pos = self._position(index)
        if pos is None:
            return  # its buffer is taken until the Adam of an earlier partition: copy later
        self._arrived.append(index)
        self._arrived_set.add(index)
        self._grad_events[index] = self._copy_in(pos, index, grad)

    def holds_grad(self, index: int) -> bool:
        """Whether the gradient of partition ``index`` handed to ``grad_ready`` this step is in,
        or on its way to, host memory this stepper owns (or is referenced by its queue), so that
        ``step`` will not read the caller's tensor: the caller may drop it and pass None for it
        to ``step``. The copy keeps its source alive until it is done (``record_stream``)."""
        return index in self._grad_events or (
            self._stream is not None and index in self._arrived_set
        )

    def _streams(self, index: int) -> bool:
        return (
            self.accepts_final_grads
            and self._asynchronous
            and not self._swaps  # NVMe reads follow the planned order
            and index in self._offloaded_set
        )

    def _stream_grad(self, index: int, grad: torch.Tensor) -> None:
        """An arriving final gradient: copy it (or leave the copy to the worker when the pool's
        buffer of its place is still in use) and queue its update."""
        assert self._copier is not None and self._worker is not None
        if self._stream is None:  # the first arrival of this step: start the job
            self._finish_job()
            hparams = {
                i: read_hparams(
                    self.kind, self.group_options[self._by_index[i].group_index], self.defaults
                )
                for i in self.offloaded
            }
            stream: queue.SimpleQueue = queue.SimpleQueue()
            job = UpdateJob(())
            self._stream, self._job = stream, job
            self._arrived.clear()
            self._arrived_set.clear()
            self._phase = Phase.GRADS_ARRIVING
            self._worker.submit(job, lambda: self._run_stream(job, stream, hparams))
        if index in self._arrived_set:
            return
        assert self._job is not None
        pos = len(self._arrived)
        self._arrived.append(index)
        self._arrived_set.add(index)
        self._job.expect(index)
        if not self._grad_pool or pos < len(self._grad_pool):
            self._stream.put((pos, index, None, self._copy_in(pos, index, grad)))
        else:
            self._stream.put((pos, index, grad, self._copier.record()))

    def _run_stream(
        self, job: UpdateJob, stream: queue.SimpleQueue, hparams: dict[int, AdamHparams]
    ) -> None:
        """Worker side of streamed final gradients: update each partition as it arrives."""
        assert self._copier is not None
        copier = self._copier
        try:
            while (item := stream.get()) is not None:
                pos, i, grad, event = item
                part = self._by_index[i]
                if grad is not None:
                    # the pool buffer of this place was read by the Adam ``pool`` places ago,
                    # which this thread has finished
                    event = copier.to_host(self._grad_dst(pos, i, grad), grad, event)
                    del grad, item
                buf = self._grad_buffer(pos, i, part.master.numel())
                copier.wait(event)
                state = self.store.acquire(i)
                self._cpu_adam(part, state, buf, hparams[i], 1.0)
                job.publish(i, self._write_back(part, state))
                self.store.release(i)
            self.store.flush()
        finally:
            copier.h2d_done()

    def _finish_stream(
        self, by_index: dict[int, tuple[_Partition, torch.Tensor]], scale: float | None, wait: bool
    ) -> None:
        """step() of a step whose gradients were streamed as final: queue the partitions that
        did not arrive (no gradient this step: zeros), the device half, and the end."""
        assert self._stream is not None and self._job is not None and self._copier is not None
        if scale not in (None, 1.0):
            self._end_stream()
            raise RuntimeError(
                f"OffloadStepper.step: grad_scale={scale} for gradients handed over as final "
                "(grad_ready(final=True) promises that no factor is applied)"
            )
        ready = self._copier.record()
        for i in self._order:
            if i in self._arrived_set:
                continue
            pos = len(self._arrived)
            self._arrived.append(i)
            self._arrived_set.add(i)
            self._job.expect(i)
            self._stream.put((pos, i, by_index[i][1], ready))
        if self._device_flow is not None:
            self._device_flow.step({i: by_index[i][1] for i in self.on_device}, scale, _writer)
        self._end_stream()
        self._phase = Phase.UPDATING
        if wait:
            self._finish_job()

    def _end_stream(self) -> None:
        """No more partitions for the streamed job: the worker finishes the queued ones."""
        if self._stream is not None:
            self._stream.put(None)
            self._stream = None
        self._arrived.clear()
        self._arrived_set.clear()

    def _position(self, index: int) -> int | None:
        """The place of an arriving partition in this step's update order, or None when its
        host buffer is not free before the step (a pool place beyond the pool's size)."""
        if self._preferred:
            pos = self._preferred.index(index)
        else:
            pos = len(self._arrived)  # no preferred order: updates follow arrivals
        if self._grad_pool and pos >= len(self._grad_pool):
            return None
        return pos

    def _grad_buffer(self, pos: int, index: int, numel: int) -> torch.Tensor:
        """The host buffer of the gradient updated ``pos``-th in a step (partition ``index``):
        its own buffer, or with the pool the rotating one of that place; the fp32 spill buffer
        where this step's gradient came in fp32 to a 16-bit buffer (see ``_grad_dst``)."""
        spill = self._grad_spill.get(index)
        if spill is not None:
            return spill
        if self._grad_pool:
            return self._grad_pool[pos % len(self._grad_pool)][:numel]
        return self._grad_host[index]

    def _copy_in(self, pos: int, index: int, grad: torch.Tensor, after: Any = None) -> Any:
        """Start the host copy of ``grad`` into its buffer (see ``Copier.to_host``); none where
        ``grad`` is that buffer (the caller's own, ``host_grad``): it is read in place."""
        assert self._copier is not None
        dst = self._grad_dst(pos, index, grad)
        if grad.device.type == "cpu" and dst.data_ptr() == grad.data_ptr():
            return None
        return self._copier.to_host(dst, grad, after)

    def _grad_dst(self, pos: int, index: int, grad: torch.Tensor) -> torch.Tensor:
        """Where the host copy of ``grad`` (partition ``index``, ``pos``-th in the update order)
        goes: the buffer of ``_grad_buffer`` when the dtypes match or it is fp32 (widening is
        exact). A copy into a 16-bit buffer of another dtype would round: a gradient that
        arrives in fp32 for a 16-bit buffer (the caller accumulated it after all) gets an fp32
        buffer of its own."""
        spill = self._grad_spill.pop(index, None)
        dst = self._grad_buffer(pos, index, grad.numel())
        if grad.dtype == dst.dtype or dst.dtype == torch.float32:
            return dst
        if spill is None or spill.numel() != grad.numel():
            spill = aligned_empty(grad.numel(), torch.float32, pin=self.config.pin_memory)
        self._grad_spill[index] = spill
        return spill

    def grad_dtype(self, index: int) -> torch.dtype:
        """The dtype of partition ``index``'s host gradient buffer: the caller's exact 16-bit
        dtype (``MasterPartition.grad_dtype``) for an offloaded partition, float32 for one kept
        on the device (``ratio`` < 1: its fused update reads the caller's fp32 gradient).
        A gradient in this dtype is copied to the host at its size (2 bytes per parameter
        instead of 4) and read by CPU Adam as it is (widened exactly in registers); a gradient
        of another dtype is accepted too (an fp32 buffer is made for it)."""
        return self._grad_dtypes.get(index, torch.float32)

    def skip_step(self) -> None:
        """The caller skips this step (fp16 overflow): forget copies started by grad_ready.
        Partitions whose final gradients already streamed in are updated (a final gradient is
        a promise that the step is taken); the others keep their values."""
        if self._stream is not None:
            self._end_stream()
            self._phase = Phase.IDLE
            self._finish_job()
            return
        if self._copier is not None:
            for event in self._grad_events.values():
                self._copier.wait(event)  # the buffers are reused by the next step's copies
        self._grad_events.clear()
        self._arrived.clear()
        self._arrived_set.clear()
        if self._swaps:
            self.store.flush()
        if self._phase is Phase.GRADS_ARRIVING:
            self._phase = Phase.IDLE

    @torch.no_grad()
    def step(
        self,
        grads: Sequence[torch.Tensor | None],
        grad_scale: float | torch.Tensor | None = None,
        *,
        wait: bool = True,
    ) -> None:
        """Update every partition with its final gradient (same order as the partitions; None
        for one whose copy this stepper holds, see ``holds_grad``) and
        write the results into ``param_shard`` (or into ``master`` where ``param_shard`` is
        None). ``grad_scale``: a factor the gradients still need (unscale and clip), applied on
        the host; with it, copies started by ``grad_ready(early_copy=True)`` are reused.
        ``wait=False`` (a caller that calls ``wait_partition`` before reading a partition's
        parameters, see ``overlaps_step``): return once the work is queued; the CPU updates run
        on the worker thread. The gradients may be freed by the caller on return."""
        if len(grads) != len(self.partitions):
            raise ValueError(
                f"OffloadStepper.step: got {len(grads)} gradients for {len(self.partitions)} "
                "partitions (pass one per partition, in partition order)"
            )
        by_index = {p.index: (p, g) for p, g in zip(self.partitions, grads)}
        for i in self.offloaded:
            part, g = by_index[i]
            if g is None:
                # without grad_scale the caller's (rescaled) tensors are copied again
                if grad_scale is None or not self.holds_grad(i):
                    raise ValueError(
                        f"OffloadStepper.step: gradient {i} is None but this stepper holds no "
                        "copy of it to use (pass None only where holds_grad(index) is True, "
                        "and with grad_scale)"
                    )
                continue
            if g.numel() != part.master.numel():
                raise ValueError(
                    f"OffloadStepper.step: gradient {i} has {g.numel()} elements, its partition "
                    f"{part.master.numel()}"
                )
        if self._stream is not None:
            self._finish_stream(by_index, None if grad_scale is None else float(grad_scale), wait)
            return
        self._finish_job()  # delayed: the last update ends before its values are published
        assert self._copier is not None
        copier = self._copier
        scale = None if grad_scale is None else float(grad_scale)
        if scale is None:
            # the caller scaled the gradients in place after any early copy: copy them again
            for event in self._grad_events.values():
                copier.wait(event)
            self._grad_events.clear()
            self._arrived.clear()
            self._arrived_set.clear()
        if self._preferred:
            order = list(self._preferred)
        else:
            # partitions whose copies started in backward first (in arrival order), the rest
            # in model order
            order = self._arrived + [i for i in self._order if i not in self._arrived_set]
        self._order = order
        if self._swaps and (self._phase is not Phase.GRADS_ARRIVING or self._prefetched != order):
            self.store.prefetch(order)  # the NVMe reads in the order of the updates
        ready = copier.record()  # the gradients are final on the current stream
        pool = len(self._grad_pool)
        # gradients the worker still has to copy; the references keep them alive until then
        pending: list[torch.Tensor | None] = [by_index[i][1] for i in order]
        # 1. queue the gradient copies not started by grad_ready: every one, or with the pool
        # as many as it has buffers (each later one when its buffer's Adam is done)
        for pos, i in enumerate(order):
            if pool and pos >= pool:
                break
            if i not in self._grad_events:
                self._grad_events[i] = self._copy_in(pos, i, by_index[i][1], ready)
            pending[pos] = None
        # 2. device-resident partitions (ratio < 1): their fused update is queued on the
        # device now and runs there while the CPU steps the others
        if self._device_flow is not None:
            self._device_flow.step({i: by_index[i][1] for i in self.on_device}, scale, _writer)
        # 3. CPU Adam per partition as its gradient lands; results stream back
        # hyper-parameters as they are now: an LR scheduler stepped right after step() returns
        # must not reach the update still running on the worker
        hparams = {
            i: read_hparams(
                self.kind, self.group_options[self._by_index[i].group_index], self.defaults
            )
            for i in order
        }
        publish = list(self._staged) if self.delayed else []
        job = UpdateJob(publish if self.delayed else order)
        grad_events = dict(self._grad_events)
        self._grad_events.clear()
        self._arrived.clear()
        self._arrived_set.clear()
        self._prefetched = None

        def body() -> None:
            self._run_updates(job, order, pending, grad_events, ready, scale, publish, hparams)

        self._job = job
        if self.delayed:
            self._staged = list(order)
        if self._asynchronous and (not wait or self.delayed):
            self._phase = Phase.UPDATING
            assert self._worker is not None
            self._worker.submit(job, body)
            if wait:
                # a caller that does not wait per partition: the last update's values must be
                # in place before it returns (the new update runs on behind it)
                for i in publish:
                    copier.stream_waits(job.wait(i))
            return
        self._phase = Phase.IDLE
        try:
            body()
        except BaseException:
            self._job = None
            raise
        job.finished.set()
        job.state = JobState.DONE
        self._finish_job()

    def _run_updates(
        self,
        job: UpdateJob,
        order: list[int],
        pending: list[torch.Tensor | None],
        grad_events: dict[int, Any],
        ready: Any,
        scale: float | None,
        publish: list[int],
        hparams: dict[int, AdamHparams],
    ) -> None:
        """The CPU side of one step (on the worker thread, or inline): publish the previous
        delayed update, then for each partition in ``order``: wait for its gradient on the
        host, CPU Adam, queue the copy of a later gradient into the freed pool buffer, write
        the result back (or stage it when delayed), publish."""
        assert self._copier is not None
        copier = self._copier
        if publish:
            # the step's backward may still be running on the device and reading the
            # parameters (or copying host shards in): publish behind it
            copier.wait(ready)
        for i in publish:
            job.publish(i, self._publish(i))
        pool = len(self._grad_pool)
        try:
            for pos, i in enumerate(order):
                part = self._by_index[i]
                copier.wait(grad_events.pop(i))
                if self.delayed:
                    # the staged values of this partition are being copied out: let them go
                    copier.wait(self._publish_events.pop(i, None))
                state = self.store.acquire(i)
                # the unscale x clip factor is applied inside CPU Adam's pass over the state
                grad = self._grad_buffer(pos, i, part.master.numel())
                self._cpu_adam(part, state, grad, hparams[i], 1.0 if scale is None else scale)
                nxt = pos + pool
                if pool and nxt < len(order):
                    # the buffer is free: Adam has consumed it
                    j = order[nxt]
                    src = pending[nxt]
                    assert src is not None
                    grad_events[j] = copier.to_host(self._grad_dst(nxt, j, src), src, ready)
                    pending[nxt] = None
                if not self.delayed:
                    job.publish(i, self._write_back(part, state))
                self.store.release(i)
            self.store.flush()
        finally:
            for event in grad_events.values():
                copier.wait(event)  # never leave a copy running into a buffer reused later
            # the pinned sources of this step's copies are rewritten at the next step
            copier.h2d_done()

    def _publish(self, index: int) -> Any:
        """delayed_update: copy the staged result of partition ``index`` to where the forward
        reads it; returns the device event of that copy (None: done)."""
        assert self._copier is not None
        part = self._by_index[index]
        staged = self._lp_host.get(index)
        if part.param_shard is None:
            # fp32 stages 0-2: the device master is the parameter storage; the host master
            # holds the values (rewritten by the next update only after this copy is done)
            src = self.store.tensors(index)["master"]
            dst = part.master.reshape(-1)
        else:
            assert staged is not None
            src, dst = staged, part.param_shard.reshape(-1)
        event = self._copier.to_device(dst, src)
        self._publish_events[index] = event
        return event

    def _cpu_adam(
        self,
        part: _Partition,
        state: dict[str, torch.Tensor],
        grad: torch.Tensor,
        h: AdamHparams,
        grad_scale: float = 1.0,
    ) -> None:
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

    def _write_back(self, part: _Partition, state: dict[str, torch.Tensor]) -> Any:
        """Put the updated values where ZeRO reads them; returns the device event of the copy
        (None: in place already)."""
        assert self._copier is not None
        lp = self._lp_host.get(part.index)
        writer = _writer(part)
        if writer is not None:
            writer(state["master"])  # copies before returning: the NVMe slot may be reused next
            return None
        if part.param_shard is None and part.master.is_meta:
            return None  # the store is the only copy (parameter offload reads it from there)
        if part.param_shard is not None:
            dst = part.param_shard.reshape(-1)
            src = lp if lp is not None else state["master"]
            if src.data_ptr() == dst.data_ptr():
                return None  # CPU Adam wrote into the host shard itself
        else:
            # fp32 stages 0-2: ZeRO's master is the parameter storage itself
            dst, src = part.master.reshape(-1), state["master"]
        event = self._copier.to_device(dst, src)
        if self.store.swapped(part.index) and lp is None:
            # the NVMe slot buffer is reused right after: the copy must be done
            self._copier.wait(event)
        return event

    def host_memory(self) -> dict[str, int]:
        """Bytes this stepper holds, by place: optimizer state in host memory and on NVMe, the
        NVMe swap buffers, gradient buffers and low-precision staging buffers (for the engine's
        one-line offload summary)."""
        sizes = {p.index: p.master.numel() * 12 for p in self.partitions}  # master + 2 moments
        on_nvme = sum(sizes[i] for i in self.offloaded if self.store.swapped(i))
        nvme = self.store.nvme if isinstance(self.store, SplitStore) else self.store
        swap_buffers = [slot.buffer for slot in getattr(nvme, "slots", [])]
        # the caller's own buffers (host_grad) are its memory, not this stepper's
        own = [t for i, t in self._grad_host.items() if i not in self._adopted]
        grads = [*self._grad_pool, *own, *self._grad_spill.values()]
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
        self._finish_job()
        if index in self.on_device:
            assert self._device_flow is not None
            part = self._by_index[index]
            return {**self._device_flow.state(part), "step": self.steps[index]}
        return {**self.store.tensors(index), "step": self.steps[index]}

    @torch.no_grad()
    def state_loaded(self) -> None:
        """Checkpoint data was written into ``state_tensors``: refresh parameters from it."""
        self._finish_job()
        self._staged = []  # the loaded masters are the values to use from now on
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
        if self._device_flow is not None:
            self._device_flow.loaded()
        self.store.loaded()

    def close(self) -> None:
        """Finish the last step's work, stop the worker thread, release host buffers and remove
        NVMe swap files."""
        try:
            self._end_stream()
            self._finish_job()
        finally:
            if self._worker is not None:
                self._worker.close()
                self._worker = None
            self.store.close()


def _sole_owner(t: torch.Tensor) -> bool:
    """True when ``t`` spans its whole storage (freeing that storage frees nothing else)."""
    return (
        not t.is_meta
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
