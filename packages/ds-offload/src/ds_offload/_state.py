"""Where offloaded optimizer partitions live between steps: CPU memory or NVMe swap files.

Both stores hand out, per partition, the fp32 ``master``, ``exp_avg`` and ``exp_avg_sq`` as CPU
tensors for the duration of that partition's update (``acquire`` / ``release``). The NVMe store
holds only ``buffer_count`` partitions in memory: reads run ahead of the update, write-backs
behind it, each buffer slot with its own IO handle so waiting on one slot never waits on another.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_offload._aio import AsyncIO
from ds_offload._nvme import SwapDir, check_nvme_path
from ds_offload._options import AioOptions
from ds_offload._pinned import DIRECT_ALIGN, aligned_empty

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class CpuStore:
    """Every partition's state in (optionally page-locked) CPU memory."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, index: int, master: torch.Tensor) -> None:
        n = master.numel()
        tensors = {k: aligned_empty(n, torch.float32, pin=self.pin) for k in STATE_KEYS}
        tensors["master"].copy_(master.reshape(-1))
        tensors["exp_avg"].zero_()
        tensors["exp_avg_sq"].zero_()
        self.state[index] = tensors

    def prefetch(self, order: Sequence[int]) -> None:
        del order  # already resident

    def acquire(self, index: int) -> dict[str, torch.Tensor]:
        return self.state[index]

    def release(self, index: int) -> None:
        del index

    def flush(self) -> None:
        pass

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        return self.state[index]

    def loaded(self) -> None:
        pass

    def swapped(self, index: int) -> bool:
        """Whether the partition's state lives in a swap file (its buffer is reused)."""
        del index
        return False

    def close(self) -> None:
        self.state.clear()


class SlotState(enum.Enum):
    """What one NVMe buffer slot holds."""

    FREE = "free"  # nothing (or a partition already written back)
    READING = "reading"  # a partition's read is in flight on the slot's handle
    HELD = "held"  # a partition's state, read and being updated
    WRITING = "writing"  # a partition's write-back is in flight on the slot's handle


@dataclass
class _Slot:
    buffer: torch.Tensor  # fp32, aligned: [master | exp_avg | exp_avg_sq], each region padded
    aio: AsyncIO
    state: SlotState = SlotState.FREE
    partition: int = -1


def _region(numel: int) -> int:
    """Elements per state region: padded so each region starts on an O_DIRECT boundary."""
    per = DIRECT_ALIGN // 4
    return -(-numel // per) * per


class NvmeStore:
    """Partition states in swap files under ``nvme_path``, ``buffer_count`` of them in memory."""

    def __init__(
        self,
        nvme_path: str | Path,
        buffer_count: int,
        pin: bool,
        aio: AioOptions,
        key: str = "zero_optimization.offload_optimizer.nvme_path",
    ) -> None:
        self.root = check_nvme_path(nvme_path, key)
        self.key = key
        self.buffer_count = max(1, buffer_count)
        self.pin = pin
        self.aio_config = aio
        self.numels: dict[int, int] = {}
        self.files: dict[int, Path] = {}
        self.slots: list[_Slot] = []
        self.swap: SwapDir | None = None
        self._materialized: dict[int, dict[str, torch.Tensor]] = {}
        self._order: list[int] = []
        self._pos: dict[int, int] = {}
        self._pending: list[tuple[int, torch.Tensor]] = []  # (index, initial master)

    # ------------------------------------------------------------------ setup
    def add(self, index: int, master: torch.Tensor) -> None:
        self.numels[index] = master.numel()
        self._pending.append((index, master))

    def finish_setup(self) -> None:
        """Reserve every swap file (all or nothing: a full disk fails here, before training)
        and write the initial states."""
        self.swap = SwapDir(self.root, self.key, "optim")
        sizes = {f"part{i}.bin": 3 * _region(n) * 4 for i, n in self.numels.items()}
        try:
            made = self.swap.reserve(sizes)
        except Exception:
            self.swap.close()
            raise
        self.files = {i: made[f"part{i}.bin"] for i in self.numels}
        try:
            biggest = max(self.numels.values(), default=0)
            for _ in range(self.buffer_count):
                buf = aligned_empty(3 * _region(biggest), torch.float32, pin=self.pin)
                self.slots.append(_Slot(buf, self._handle()))
            slot = self.slots[0]
            for index, master in self._pending:
                views = self._views(slot.buffer, self.numels[index])
                slot.buffer.zero_()
                views["master"].copy_(master.reshape(-1))
                slot.aio.pwrite(slot.buffer[: 3 * _region(self.numels[index])], self.files[index])
        except BaseException:
            # an IO error writing the initial states: remove every swap file (all or nothing),
            # the caller's masters are untouched
            self.close()
            raise
        self._pending.clear()

    def _handle(self) -> AsyncIO:
        return AsyncIO.from_config(self.aio_config)

    @staticmethod
    def _views(buffer: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
        r = _region(numel)
        return {k: buffer[j * r : j * r + numel] for j, k in enumerate(STATE_KEYS)}

    # ------------------------------------------------------------------ per step
    def _slot_of(self, index: int) -> _Slot:
        return self.slots[self._pos[index] % self.buffer_count]

    def _start_read(self, index: int) -> None:
        slot = self._slot_of(index)
        if slot.partition == index and slot.state in (SlotState.READING, SlotState.HELD):
            return
        if slot.state is SlotState.HELD:
            raise RuntimeError(
                f"ds_offload: NVMe buffer slot still holds partition {slot.partition}; "
                "release it before reading another into the slot"
            )
        slot.aio.wait()  # a write-back of the slot's previous partition must finish first
        n = self.numels[index]
        slot.aio.pread(slot.buffer[: 3 * _region(n)], self.files[index], async_op=True)
        slot.state, slot.partition = SlotState.READING, index

    def prefetch(self, order: Sequence[int]) -> None:
        """Declare the update order of this step and start the first reads."""
        self._flush_materialized()
        self._order = list(order)
        self._pos = {index: p for p, index in enumerate(self._order)}
        for index in self._order[: self._ahead]:
            self._start_read(index)

    @property
    def _ahead(self) -> int:
        # Partitions read ahead of the one being updated (itself included): the slot read into
        # next was released two updates ago, so its write-back had one whole update to finish.
        return max(1, self.buffer_count - 1)

    def acquire(self, index: int) -> dict[str, torch.Tensor]:
        pos = self._pos[index]
        self._start_read(index)
        nxt = pos + self._ahead - 1
        if self._ahead > 1 and nxt < len(self._order):
            self._start_read(self._order[nxt])
        slot = self._slot_of(index)
        if slot.state is SlotState.READING:
            slot.aio.wait()
            slot.state = SlotState.HELD
        return self._views(slot.buffer, self.numels[index])

    def release(self, index: int) -> None:
        slot = self._slot_of(index)
        n = self.numels[index]
        slot.aio.pwrite(slot.buffer[: 3 * _region(n)], self.files[index], async_op=True)
        slot.state = SlotState.WRITING

    def flush(self) -> None:
        """Wait for every write-back (errors surface here, naming the file)."""
        for slot in self.slots:
            slot.aio.wait()
            slot.state, slot.partition = SlotState.FREE, -1

    # ------------------------------------------------------------------ checkpoints
    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The partition's state read into memory (kept until the next step or ``loaded``):
        filling these tensors and calling ``loaded`` writes them back."""
        if index not in self._materialized:
            self.flush()
            n = self.numels[index]
            buf = aligned_empty(3 * _region(n), torch.float32)
            self.slots[0].aio.pread(buf, self.files[index])
            self._materialized[index] = self._views(buf, n) | {"_buffer": buf}
        return {k: v for k, v in self._materialized[index].items() if k != "_buffer"}

    def _flush_materialized(self) -> None:
        if not self._materialized:
            return
        self.flush()
        aio = self.slots[0].aio
        for index, views in self._materialized.items():
            aio.pwrite(views["_buffer"], self.files[index], async_op=True)
        aio.wait()
        self._materialized.clear()

    def loaded(self) -> None:
        self._flush_materialized()

    def swapped(self, index: int) -> bool:
        del index
        return True

    def close(self) -> None:
        for slot in self.slots:
            slot.aio.close()
        self.slots.clear()
        if self.swap is not None:
            self.swap.close()


class SplitStore:
    """The first partitions, up to ``max_in_cpu`` elements, in a ``CpuStore``; the others in an
    ``NvmeStore``: optimizer state larger than host memory without swapping all of it.

    The step visits partitions in order, so the CPU-held ones are updated first while the NVMe
    reads of the others (started by ``prefetch`` during backward) run.
    """

    def __init__(self, cpu: CpuStore, nvme: NvmeStore, max_in_cpu: int) -> None:
        self.cpu = cpu
        self.nvme = nvme
        self.left = max_in_cpu
        self.where: dict[int, CpuStore | NvmeStore] = {}

    def add(self, index: int, master: torch.Tensor) -> None:
        n = master.numel()
        if n <= self.left:
            self.left -= n
            self.where[index] = self.cpu
        else:
            self.left = 0  # later, smaller partitions go to NVMe too: the CPU part stays a prefix
            self.where[index] = self.nvme
        self.where[index].add(index, master)

    def finish_setup(self) -> None:
        self.nvme.finish_setup()

    def prefetch(self, order: Sequence[int]) -> None:
        self.nvme.prefetch([i for i in order if self.where[i] is self.nvme])

    def acquire(self, index: int) -> dict[str, torch.Tensor]:
        return self.where[index].acquire(index)

    def release(self, index: int) -> None:
        self.where[index].release(index)

    def flush(self) -> None:
        self.nvme.flush()

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        return self.where[index].tensors(index)

    def loaded(self) -> None:
        self.nvme.loaded()

    def swapped(self, index: int) -> bool:
        return self.where[index] is self.nvme

    def close(self) -> None:
        self.cpu.close()
        self.nvme.close()
