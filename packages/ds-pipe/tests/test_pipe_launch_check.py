"""Pipeline objects built in a launched rank of several without a process group are an error
(each rank would build and train the whole model alone)."""

from __future__ import annotations

import pytest
import torch

import ds_comm
import ds_pipe

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_pipeline_module_in_launched_rank_without_group_is_an_error(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "1")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(
        ds_comm.NotInitializedError,
        match=r"ds_pipe\.PipelineModule: this process is rank 1 of 2 \(OMPI_COMM_WORLD_SIZE=2",
    ):
        ds_pipe.PipelineModule([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], num_stages=2)


def test_runtime_in_launched_rank_without_group_is_an_error(clean_env):
    # a module built alone, then the process finds itself launched as one of two
    module = ds_pipe.PipelineModule([torch.nn.Linear(2, 2)], num_stages=1)
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ds_comm.NotInitializedError, match=r"ds_pipe\.PipelineRuntime: .*rank 0 of 2"
    ):
        ds_pipe.PipelineRuntime(module, torch.optim.SGD(module.parameters(), lr=0.1))


def test_lone_process_builds(clean_env):
    module = ds_pipe.PipelineModule([torch.nn.Linear(2, 2)], num_stages=1)
    ds_pipe.PipelineRuntime(module, torch.optim.SGD(module.parameters(), lr=0.1))
