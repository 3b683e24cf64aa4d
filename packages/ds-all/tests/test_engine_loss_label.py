"""The engine's steps_per_print line labels its loss as the mean over the data-parallel ranks
(scripts usually print rank 0's own loss next to it), and the value is that mean."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402

import ds_all  # noqa: E402
from ds_comm.testing import distributed_test  # noqa: E402


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@distributed_test(world_size=2, timeout=180)
def test_print_line_says_mean_loss_over_ranks(world_size):
    torch.manual_seed(0)
    engine, _, _, _ = ds_all.initialize(
        model=TinyGPT(), config=config(1, 4, 1, steps_per_print=1), dist_init_required=False
    )
    lines = _Lines()
    logging.getLogger("ds_all").addHandler(lines)
    try:
        x, y = batch(0, 4 * dist.get_world_size())
        rank = dist.get_rank()
        loss = engine(x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4])
        engine.backward(loss)
        engine.step()
    finally:
        logging.getLogger("ds_all").removeHandler(lines)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= world_size
    steps = [line for line in lines.lines if line.startswith("step ")]
    if rank == 0:
        (line,) = steps
        label, value = line.split(" | ")[1].rsplit(" ", 1)
        assert label == f"mean loss over {world_size} ranks"
        assert float(value) == pytest.approx(mean.item(), abs=1e-4)
    else:
        assert steps == []  # only rank 0 prints
    engine.close()
