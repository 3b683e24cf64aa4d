"""An MoE layer built in a launched rank of several without a process group is an error (each
rank would hold every expert and train alone)."""

from __future__ import annotations

import pytest
import torch

import ds_comm
import ds_moe

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("ep_size", [1, 2])
def test_moe_in_launched_rank_without_group_is_an_error(clean_env, ep_size):
    clean_env.setenv("PMI_RANK", "1")
    clean_env.setenv("PMI_SIZE", "2")
    with pytest.raises(
        ds_comm.NotInitializedError, match=r"ds_moe\.MoE: this process is rank 1 of 2 \(PMI_SIZE=2"
    ):
        ds_moe.MoE(8, torch.nn.Linear(8, 8), num_experts=2, ep_size=ep_size)


def test_lone_process_builds(clean_env):
    moe = ds_moe.MoE(8, torch.nn.Linear(8, 8), num_experts=2)
    out, l_aux, _ = moe(torch.randn(4, 8))
    assert out.shape == (4, 8) and l_aux.ndim == 0
