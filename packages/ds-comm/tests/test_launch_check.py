"""require_initialized_if_launched: a launched rank of several without a process group is an
error naming the launcher variable and the fix; a lone process or an initialised one passes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ds_comm
from ds_comm.testing import distributed_test


@pytest.mark.parametrize(
    ("env", "variable", "rank", "world"),
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE", 1, 2),
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE", 3, 4),
        ({"PMI_RANK": "0", "PMI_SIZE": "8"}, "PMI_SIZE", 0, 8),
        ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"}, "MV2_COMM_WORLD_SIZE", 1, 2),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, "SLURM_NTASKS", 2, 4),
        (
            {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"},
            "SLURM_STEP_NUM_TASKS",
            1,
            2,
        ),
    ],
)
def test_launched_rank_without_process_group_is_an_error(env, variable, rank, world):
    found = ds_comm.launched_rank(env)
    assert found == ds_comm.LaunchedRank(rank, world, variable, found.launcher)
    with pytest.raises(ds_comm.NotInitializedError) as info:
        ds_comm.require_initialized_if_launched("pkg.Thing", env)
    msg = str(info.value)
    assert msg.startswith(f"pkg.Thing: this process is rank {rank} of {world} ({variable}={world}")
    assert "torch.distributed is not initialised" in msg
    assert "call ds_comm.init_distributed()" in msg and f"unset {variable}" in msg


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"RANK": "0", "WORLD_SIZE": "1"},  # torchrun --nproc_per_node 1
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
        {"OMPI_COMM_WORLD_SIZE": "1"},
        {"MASTER_ADDR": "host", "MASTER_PORT": "29500"},  # not a launcher by themselves
        {"WORLD_SIZE": "two"},  # malformed: left for discover() to report
    ],
)
def test_lone_process_passes(env):
    assert ds_comm.launched_rank(env) is None
    ds_comm.require_initialized_if_launched("pkg.Thing", env)


def test_world_size_without_rank_still_names_the_world():
    with pytest.raises(ds_comm.NotInitializedError, match=r"this process is a rank of 2"):
        ds_comm.require_initialized_if_launched("pkg.Thing", {"WORLD_SIZE": "2"})


def test_reads_the_process_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    with pytest.raises(ds_comm.NotInitializedError, match=r"rank 1 of 2 \(SLURM_NTASKS=2"):
        ds_comm.require_initialized_if_launched("pkg.Thing")


def test_in_a_fresh_launched_process():
    """What a user sees: a script started with torchrun's variables but no init_distributed."""
    code = "import ds_comm; ds_comm.require_initialized_if_launched('my_script')"
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME")})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "NotInitializedError: my_script: this process is rank 1 of 2 (WORLD_SIZE=2" in r.stderr


@distributed_test(world_size=2)
def test_initialised_group_passes(world_size):
    # the harness's ranks carry torchrun's variables and an initialised group: no error
    ds_comm.require_initialized_if_launched("pkg.Thing", {"RANK": "1", "WORLD_SIZE": "2"})
