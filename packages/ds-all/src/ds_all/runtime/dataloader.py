"""``deepspeed.runtime.dataloader``: ``RepeatingLoader``, which pipeline scripts wrap their
loader in so that ``engine.train_batch(data_iter)`` never runs out of data, and
``DeepSpeedDataLoader``, DeepSpeed's loader class for scripts that build one themselves.

``DeepSpeedDataLoader`` draws as DeepSpeed's does: with ``local_rank >= 0`` a
``DistributedSampler`` over the data-parallel ranks (shuffled, seed 0, the same order every
epoch unless the script calls ``loader.data_sampler.set_epoch``), else a ``RandomSampler`` with
the batch multiplied by the device count; with ``curriculum_learning`` in
``deepspeed_dataloader_config``, ds_data's ``DeepSpeedDataSampler`` chooses the batches.
(``initialize(training_data=...)`` returns a plain torch ``DataLoader`` drawing the same
samples.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

__all__ = ["DeepSpeedDataLoader", "RepeatingLoader"]


class RepeatingLoader:
    """Iterate ``loader`` forever: when it is exhausted, start it again (a DataLoader
    reshuffles then as for a new epoch, if its sampler does)."""

    loader: Iterable[Any]
    data_iter: Iterator[Any]

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.data_iter = iter(loader)

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            # an empty loader raises StopIteration again: nothing to repeat
            return next(self.data_iter)


class DeepSpeedDataLoader:
    """DeepSpeed's loader: ``iter(loader)`` starts an epoch, ``len(loader)`` is its batch
    count, and ``tput_timer.start()`` (when given) runs before each batch is fetched."""

    def __init__(self, dataset: Any, batch_size: int, pin_memory: bool, local_rank: int,
                 tput_timer: Any, collate_fn: Any = None, num_local_io_workers: int | None = None,
                 data_sampler: Any = None, data_parallel_world_size: int | None = None,
                 data_parallel_rank: int | None = None, dataloader_drop_last: bool = False,
                 deepspeed_dataloader_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        from ds_accel import get_accelerator

        cfg = deepspeed_dataloader_config or {}
        self.deepspeed_dataloader_config = cfg
        self.tput_timer = tput_timer
        self.curriculum_learning_enabled = bool(cfg.get("curriculum_learning", False))
        if self.curriculum_learning_enabled:
            from ds_data import DeepSpeedDataSampler

            data_sampler = DeepSpeedDataSampler(
                cfg["data_efficiency"], len(dataset), batch_size, data_parallel_rank,
                data_parallel_world_size, cfg["data_parallel_group"],
                cfg["gradient_accumulation_steps"], cfg["global_rank"],
                drop_last=dataloader_drop_last,
            )  # fmt: skip
            device_count = get_accelerator().device_count()
            num_local_io_workers = cfg["num_workers"]
        else:
            if local_rank >= 0:
                if data_sampler is None:
                    data_sampler = DistributedSampler(
                        dataset, num_replicas=data_parallel_world_size, rank=data_parallel_rank
                    )
                device_count = 1
            else:
                if data_sampler is None:
                    data_sampler = RandomSampler(dataset)
                device_count = get_accelerator().device_count()
                batch_size *= device_count
            if num_local_io_workers is None:
                num_local_io_workers = 2 * device_count
        self.num_local_io_workers = num_local_io_workers
        self.data_sampler = data_sampler
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.device_count = device_count
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.dataloader_drop_last = dataloader_drop_last
        self.post_process_func: Any = None
        self.data: Iterator[Any] | None = None
        self.dataloader: DataLoader | None = None
        n = len(self.data_sampler)
        self.len = n // batch_size if dataloader_drop_last else math.ceil(n / batch_size)

    def __iter__(self) -> DeepSpeedDataLoader:
        self._create_dataloader()
        return self

    def __len__(self) -> int:
        return self.len

    def __next__(self) -> Any:
        if self.tput_timer:
            self.tput_timer.start()
        if self.data is None:
            self._create_dataloader()
        assert self.data is not None
        batch = next(self.data)
        if self.curriculum_learning_enabled and self.post_process_func is not None:
            batch = self.post_process_func(batch, self.data_sampler.state_dict())
        return batch

    def _create_dataloader(self) -> DataLoader:
        extra = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        if self.curriculum_learning_enabled:
            self.dataloader = DataLoader(self.dataset, pin_memory=self.pin_memory,
                                         batch_sampler=self.data_sampler,
                                         num_workers=self.num_local_io_workers, **extra)  # fmt: skip
        else:
            self.dataloader = DataLoader(self.dataset, batch_size=self.batch_size,
                                         pin_memory=self.pin_memory, sampler=self.data_sampler,
                                         num_workers=self.num_local_io_workers,
                                         drop_last=self.dataloader_drop_last, **extra)  # fmt: skip
        self.data = iter(self.dataloader)
        return self.dataloader
