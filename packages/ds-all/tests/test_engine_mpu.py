"""initialize(mpu=...) on 2 gloo ranks: ZeRO reduces over the mpu's data-parallel group, not
the world, and the training_data loader shards over that group; without an mpu, over the world."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config, plain_setup  # noqa: E402

from ds_comm.testing import run_distributed  # noqa: E402

STEPS = 3


class _MPU:
    """Megatron-style model-parallel unit: here every rank is its own data-parallel group (two
    model-parallel ranks of one replica each)."""

    def __init__(self, group, rank: int) -> None:
        self.group, self.rank = group, rank

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return self.rank

    def get_model_parallel_world_size(self) -> int:
        return 2


def _data(rank: int, step: int):
    return batch(step + 50 * rank, 4)  # each rank its own stream


def _rank_main(stage: int):
    import torch.distributed as dist

    import ds_all

    rank = dist.get_rank()
    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    data = TensorDataset(torch.arange(16))

    # no mpu: the loader shards the dataset over the 2 ranks
    torch.manual_seed(0)
    _, _, world_loader, _ = ds_all.initialize(model=TinyGPT(), training_data=data,
                                              config=config(stage, 4), dist_init_required=False)  # fmt: skip
    world_rows = torch.cat([b[0] for b in world_loader]).tolist()

    torch.manual_seed(0)
    engine, _, loader, _ = ds_all.initialize(model=TinyGPT(), training_data=data, mpu=_MPU(groups[rank], rank),
                                             config=config(stage, 4), dist_init_required=False)  # fmt: skip
    assert engine.world_size == 1 and engine.train_batch_size() == 4
    mpu_rows = torch.cat([b[0] for b in loader]).tolist()
    losses = []
    for step in range(STEPS):
        loss = engine(*_data(rank, step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    state = engine.zero.full_state_dict()
    engine.close()
    return world_rows, mpu_rows, losses, state


def _plain(rank: int):
    model, opt, sched = plain_setup()
    losses = []
    for step in range(STEPS):
        loss = model(*_data(rank, step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


@pytest.mark.parametrize("stage", [2])
def test_mpu_data_parallel_group_is_used(stage):
    results = run_distributed(_rank_main, 2, args=(stage,), timeout=180)
    (w0, m0, _, _), (w1, m1, _, _) = results
    assert sorted(w0 + w1) == list(range(16)) and not set(w0) & set(w1)  # world: 2 shards
    assert sorted(m0) == sorted(m1) == list(range(16))  # mpu group of 1: the whole dataset
    for rank, (_, _, losses, state) in enumerate(results):
        ref_losses, ref_state = _plain(rank)  # one process on this rank's data alone
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
    # had ZeRO averaged over the world, both ranks would hold the same weights
    assert not torch.equal(results[0][3]["head.weight"], results[1][3]["head.weight"])
