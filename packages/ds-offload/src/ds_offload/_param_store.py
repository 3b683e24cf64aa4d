"""``NvmeParamStore``: stage 3's compute-dtype parameter shards on NVMe (ZeRO-Infinity).

It implements ds_zero's ``ParamShardStore`` protocol structurally (``add``, ``acquire``,
``release``, ``write``, ``flush``, ``close``): each rank's shard of each ZeRO bucket lives in a
swap file under ``offload_param.nvme_path``; the first ``max_in_cpu`` elements' worth of shards
stay in host memory instead. At most ``buffer_count`` NVMe shards are in memory at once, in
aligned (and, with ``pin_memory``, page-locked) buffers sized for the largest shard.

Reads run ahead of use: stage 3 gathers buckets in the same order every step (forward, then
backward in reverse), so the store learns which key follows each pair of consecutive keys and,
on every ``acquire``, starts the reads of the next ``buffer_count - 1`` predicted keys. Writes
(after each optimizer step) go out asynchronously, one per buffer, and keep the buffer's
contents valid, so a shard written and then gathered again is not read back.
"""

from __future__ import annotations

import enum
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_offload._aio import AsyncIO
from ds_offload._coerce import coerce
from ds_offload._errors import OffloadWarning
from ds_offload._nvme import SwapDir, check_nvme_path
from ds_offload._options import AioOptions, OffloadDevice, OffloadParamOptions
from ds_offload._pinned import DIRECT_ALIGN, aligned_empty

KEY = "zero_optimization.offload_param"


class SlotState(enum.Enum):
    """What one buffer holds."""

    FREE = "free"  # nothing
    READING = "reading"  # a shard's read is in flight
    VALID = "valid"  # a shard's current values (a write-back of them may be in flight)


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8, aligned, the largest NVMe shard's bytes
    aio: AsyncIO
    state: SlotState = SlotState.FREE
    key: int = -1
    held: bool = False  # acquired and not yet released: never evicted
    writing: bool = False  # a write-back from the buffer is in flight on ``aio``
    ready: Any | None = None  # the caller's copy out of the buffer completes with this event
    last_use: int = 0


@dataclass
class _Shard:
    numel: int
    dtype: torch.dtype
    file: Path | None = None  # None: resident in host memory
    resident: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class StoreStats:
    """Counters for tests and reports."""

    reads: int = 0  # NVMe reads started
    prefetched: int = 0  # of which started ahead of use
    hits: int = 0  # acquires served by a buffer already holding (or reading) the shard
    writes: int = 0  # NVMe writes
    resident: int = 0  # shards kept in host memory (max_in_cpu)
    on_nvme: int = 0  # shards in swap files


class NvmeParamStore:
    """Parameter shards in swap files under ``nvme_path`` (see module docstring).

    config: an ``offload_param`` section (dict, pydantic model or ``OffloadParamOptions``) with
        ``device: nvme``; uses nvme_path, pin_memory, buffer_count, buffer_size (largest shard
        expected; a larger one sizes the buffers with a warning,
        in elements) and max_in_cpu (elements kept in host memory).
    aio: the ``aio`` section (block_size, queue_depth, thread_count, ...).
    """

    def __init__(self, config: Any = None, *, aio: Any = None) -> None:
        options = coerce(OffloadParamOptions, config, KEY)
        if options.device is not OffloadDevice.nvme:
            raise ValueError(
                f"NvmeParamStore: {KEY}.device is {options.device.value!r}; it stores shards on "
                "NVMe (device: nvme). For device: cpu, ds_zero keeps host shards itself "
                "(ZeroOptions.host_param_shards)"
            )
        self.options: OffloadParamOptions = options
        self.aio_config: AioOptions = coerce(AioOptions, aio, "aio")
        self.root = check_nvme_path(options.nvme_path, f"{KEY}.nvme_path")
        self.swap = SwapDir(self.root, f"{KEY}.nvme_path", "param")
        self.shards: dict[int, _Shard] = {}
        self.slots: list[_Slot] = []
        self.stats = StoreStats()
        self._cpu_left = options.max_in_cpu
        self._setup_io: AsyncIO | None = None
        self._clock = itertools.count(1)
        self._follows: dict[tuple[int | None, int], int] = {}  # (previous, current) -> next
        self._prev: tuple[int | None, int | None] = (None, None)
        # resident shards released with a copy still in flight: waited for before a write
        self._resident_ready: dict[int, Any] = {}
        self._closed = False
        self._warned_size = False

    # ------------------------------------------------------------------ setup
    def add(self, key: int, values: torch.Tensor) -> None:
        if key in self.shards:
            raise ValueError(f"NvmeParamStore.add: key {key} was added already")
        if self.slots:
            raise RuntimeError("NvmeParamStore.add: shards must all be added before first use")
        flat = values.detach().reshape(-1)
        shard = _Shard(flat.numel(), flat.dtype)
        if shard.numel <= self._cpu_left:
            self._cpu_left -= shard.numel
            shard.resident = aligned_empty(shard.numel, shard.dtype, pin=self.options.pin_memory)
            shard.resident.copy_(flat)
            self.shards[key] = shard
            self.stats.resident += 1
            return
        if shard.numel > self.options.buffer_size and not self._warned_size:
            # DeepSpeed swaps single parameters, each within buffer_size; ds-zero swaps a unit's
            # whole bucket shard (a transformer block), which can be larger: the buffers are
            # sized for the largest shard instead of failing on a DeepSpeed config
            self._warned_size = True
            warnings.warn(
                f"{KEY}.buffer_size is {self.options.buffer_size} elements but a parameter shard "
                f"(one ZeRO-3 bucket of this rank) has {shard.numel}; the {self.options.buffer_count} "
                "buffers are sized for the largest shard instead. Set buffer_size to at least "
                "that to silence this",
                OffloadWarning,
                stacklevel=2,
            )
        padded = -(-shard.nbytes // DIRECT_ALIGN) * DIRECT_ALIGN
        try:
            # reserved (fallocate) now: a full disk is an error here, naming the path and bytes
            shard.file = self.swap.reserve({f"shard{key}.bin": padded})[f"shard{key}.bin"]
            staging = aligned_empty(shard.numel, shard.dtype)
            staging.copy_(flat)
            if self._setup_io is None:
                self._setup_io = AsyncIO.from_config(self.aio_config)
            self._setup_io.pwrite(staging, shard.file)
        except BaseException:
            self.close()  # no swap files left behind; the caller still holds ``values``
            raise
        self.shards[key] = shard
        self.stats.on_nvme += 1
        self.stats.writes += 1

    def _largest_nvme_shard(self) -> int:
        """Bytes of the largest shard in a swap file (what each buffer must hold); 0: none."""
        return max((s.nbytes for s in self.shards.values() if s.file is not None), default=0)

    def _make_slots(self) -> None:
        biggest = self._largest_nvme_shard()
        if biggest == 0:
            return
        for _ in range(self.options.buffer_count):
            buf = aligned_empty(biggest, torch.uint8, pin=self.options.pin_memory)
            self.slots.append(_Slot(buf, AsyncIO.from_config(self.aio_config)))
        if self._setup_io is not None:
            self._setup_io.close()
            self._setup_io = None

    # ------------------------------------------------------------------ slots
    def _view(self, slot: _Slot, shard: _Shard) -> torch.Tensor:
        return slot.buffer[: shard.nbytes].view(shard.dtype)

    def _slot_holding(self, key: int) -> _Slot | None:
        for slot in self.slots:
            if slot.key == key and slot.state is not SlotState.FREE:
                return slot
        return None

    def _free_slot(self, keep: set[int]) -> _Slot | None:
        """The least recently used buffer not held and not holding a key in ``keep``, emptied
        (its write-back and the caller's copy out of it finished)."""
        candidates = [s for s in self.slots if not s.held and s.key not in keep]
        if not candidates:
            return None
        slot = min(candidates, key=lambda s: (s.state is not SlotState.FREE, s.last_use))
        self._settle(slot)
        slot.state, slot.key = SlotState.FREE, -1
        return slot

    def _claim_slot(self) -> _Slot:
        """A buffer for a shard that none holds: the least recently used one not held."""
        slot = self._free_slot(keep=set())
        if slot is None:
            raise RuntimeError(
                f"NvmeParamStore: all {KEY}.buffer_count={self.options.buffer_count} buffers "
                "are held (acquired and not released); raise buffer_count"
            )
        return slot

    @staticmethod
    def _finish_io(slot: _Slot) -> None:
        """Wait for the buffer's read or write-back in flight (one handle serves both)."""
        if slot.state is SlotState.READING or slot.writing:
            slot.aio.wait()
            slot.writing = False
            if slot.state is SlotState.READING:
                slot.state = SlotState.VALID

    def _settle(self, slot: _Slot) -> None:
        """Finish whatever is in flight on the buffer (read, write-back, the caller's copy)."""
        self._finish_io(slot)
        if slot.ready is not None:
            slot.ready.synchronize()
            slot.ready = None

    def _start_read(self, slot: _Slot, key: int, ahead: bool) -> None:
        shard = self.shards[key]
        assert shard.file is not None
        slot.aio.pread(self._view(slot, shard), shard.file, async_op=True)
        slot.state, slot.key = SlotState.READING, key
        slot.last_use = next(self._clock)
        self.stats.reads += 1
        self.stats.prefetched += int(ahead)

    # ------------------------------------------------------------------ read path
    def acquire(self, key: int) -> torch.Tensor:
        shard = self._shard(key, "acquire")
        predicted = self._learn(key)
        if shard.resident is not None:
            self._prefetch(predicted)
            return shard.resident
        if not self.slots:
            self._make_slots()
        slot = self._slot_holding(key)
        if slot is not None:
            self.stats.hits += 1
        else:
            slot = self._claim_slot()
            self._start_read(slot, key, ahead=False)
        if slot.state is SlotState.READING:
            # not _settle: the caller's copy out of the buffer's previous use need not finish
            self._finish_io(slot)
        slot.held = True
        slot.last_use = next(self._clock)
        self._prefetch(predicted, current=key)
        return self._view(slot, shard)

    def release(self, key: int, ready: Any | None = None) -> None:
        if self.shards.get(key) is not None and self.shards[key].resident is not None:
            if ready is not None:
                self._resident_ready[key] = ready
            return
        slot = self._slot_holding(key)
        if slot is None or not slot.held:
            raise RuntimeError(f"NvmeParamStore.release: key {key} is not acquired")
        slot.held = False
        slot.ready = ready

    def _learn(self, key: int) -> list[int]:
        """Record that ``key`` followed the previous two keys; the keys predicted to come next."""
        p2, p1 = self._prev
        if p1 is not None:
            self._follows[(p2, p1)] = key
        self._prev = (p1, key)
        out: list[int] = []
        ctx: tuple[int | None, int] = (p1, key)
        want = max(0, self.options.buffer_count - 1)
        for _ in range(4 * want + 4):  # resident keys on the way do not use a buffer
            if len(out) >= want or ctx not in self._follows:
                break
            nxt = self._follows[ctx]
            if nxt == key or nxt in out:
                break
            if self.shards[nxt].resident is None:
                out.append(nxt)
            ctx = (ctx[1], nxt)
        return out

    def _prefetch(self, keys: list[int], current: int | None = None) -> None:
        if not keys or not self.slots:
            return
        keep = set(keys) | ({current} if current is not None else set())
        for key in keys:
            if self._slot_holding(key) is not None:
                continue
            slot = self._free_slot(keep)
            if slot is None:
                return
            self._start_read(slot, key, ahead=True)

    # ------------------------------------------------------------------ write path
    def write(self, key: int, values: torch.Tensor) -> None:
        shard = self._shard(key, "write")
        flat = values.detach().reshape(-1)
        if flat.numel() != shard.numel:
            raise ValueError(
                f"NvmeParamStore.write: key {key} holds {shard.numel} elements, got {flat.numel()}"
            )
        if shard.resident is not None:
            ready = self._resident_ready.pop(key, None)
            if ready is not None:
                ready.synchronize()  # a device copy may still be reading the tensor
            shard.resident.copy_(flat)
            return
        if not self.slots:
            self._make_slots()
        slot = self._slot_holding(key)
        if slot is not None and slot.held:
            raise RuntimeError(
                f"NvmeParamStore.write: key {key} is acquired; release it before writing"
            )
        if slot is None:
            slot = self._claim_slot()
        else:
            self._settle(slot)  # the buffer's previous write-back must finish before changing it
        view = self._view(slot, shard)
        view.copy_(flat)
        assert shard.file is not None
        slot.aio.pwrite(view, shard.file, async_op=True)
        slot.state, slot.key, slot.writing = SlotState.VALID, key, True
        slot.last_use = next(self._clock)
        self.stats.writes += 1

    def flush(self) -> None:
        for slot in self.slots:
            self._finish_io(slot)

    # ------------------------------------------------------------------ misc
    def read(self, key: int) -> torch.Tensor:
        """A copy of the shard's current values (for tests and inspection)."""
        out = self.acquire(key).clone()
        self.release(key)
        return out

    def _shard(self, key: int, what: str) -> _Shard:
        if self._closed:
            raise RuntimeError(f"NvmeParamStore.{what}: the store is closed")
        try:
            return self.shards[key]
        except KeyError:
            raise KeyError(f"NvmeParamStore.{what}: no shard with key {key}") from None

    def nvme_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards.values() if s.file is not None)

    def host_memory(self) -> dict[str, int]:
        """Bytes by place: shards kept in host memory (max_in_cpu), on NVMe, and the buffers
        (allocated at first use, sized for the largest NVMe shard)."""
        biggest = self._largest_nvme_shard()
        return {
            "param_shards_host": sum(s.nbytes for s in self.shards.values() if s.file is None),
            "param_shards_nvme": self.nvme_bytes(),
            "param_buffers": self.options.buffer_count * biggest if biggest else 0,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for slot in self.slots:
                slot.aio.close()
            if self._setup_io is not None:
                self._setup_io.close()
        finally:
            self.slots.clear()
            self.swap.close()


__all__ = ["NvmeParamStore", "StoreStats"]
