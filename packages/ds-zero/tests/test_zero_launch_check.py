"""A ZeRO object built in a launched rank of several without a process group is an error (each
rank would silently train alone); a lone process still builds one."""

from __future__ import annotations

import pytest
import torch

import ds_comm
import ds_zero

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _model_and_opt():
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.fixture
def launched_rank_1_of_2(monkeypatch):
    for var in LAUNCH_VARS + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_wrap_in_launched_rank_without_group_is_an_error(launched_rank_1_of_2, stage):
    model, opt = _model_and_opt()
    with pytest.raises(
        ds_comm.NotInitializedError,
        match=r"ds_zero\.wrap: this process is rank 1 of 2 \(WORLD_SIZE=2",
    ) as e:
        ds_zero.wrap(model, opt, ds_zero.ZeroOptions(stage=stage))
    assert "call ds_comm.init_distributed()" in str(e.value)


def test_init_in_launched_rank_without_group_is_an_error(launched_rank_1_of_2):
    with pytest.raises(ds_comm.NotInitializedError, match=r"ds_zero\.Init: this process is rank 1"):
        ds_zero.Init()
    ds_zero.Init(enabled=False)  # a disabled context partitions nothing: nothing to refuse


def test_slurm_rank_without_group_is_an_error(monkeypatch):
    for var in LAUNCH_VARS + ("SLURM_STEP_NUM_TASKS",):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    model, opt = _model_and_opt()
    with pytest.raises(ds_comm.NotInitializedError, match=r"rank 0 of 4 \(SLURM_NTASKS=4"):
        ds_zero.wrap(model, opt, ds_zero.ZeroOptions(stage=2))


def test_single_rank_launch_builds(monkeypatch):
    for var in LAUNCH_VARS + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    model, opt = _model_and_opt()
    zero = ds_zero.wrap(model, opt, ds_zero.ZeroOptions(stage=2))
    zero.close()
