"""``deepspeed.runtime.dataloader``: ``RepeatingLoader``, which pipeline scripts wrap their
loader in so that ``engine.train_batch(data_iter)`` never runs out of data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["RepeatingLoader"]


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
