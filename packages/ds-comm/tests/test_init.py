"""init_distributed with real launchers: torchrun, the harness' torchrun-style environment,
SLURM variables, and (test_mpi.py) mpirun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ds_comm
from ds_comm import DiscoveryError, Source
from ds_comm.testing import free_port, run_distributed

SCRIPTS = Path(__file__).parent / "scripts"


def test_torchrun_two_ranks():
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(SCRIPTS / "torchrun_init.py"),
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("TORCHRUN-OK") == 2, p.stdout


def _env_then_slurm(slurm_port: int) -> str:
    import torch.distributed as dist

    layout = ds_comm.init_distributed(dist_backend="gloo", timeout=60)
    assert layout.source is Source.ENV and layout.rank == int(os.environ["RANK"])
    assert ds_comm.init_distributed().source is Source.EXISTING  # idempotent
    with pytest.raises(RuntimeError, match="already initialised with backend 'gloo'"):
        ds_comm.init_distributed(dist_backend="nccl")
    ds_comm.destroy_process_group()
    assert not dist.is_initialized()

    # The same ranks again, this time described only by srun's variables.
    slurm = {
        "SLURM_PROCID": str(layout.rank),
        "SLURM_NTASKS": str(layout.world_size),
        "SLURM_LOCALID": str(layout.rank),
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(slurm_port),
    }
    s = ds_comm.init_distributed(dist_backend="gloo", env=slurm)
    assert s.source is Source.SLURM and s.master_addr == "127.0.0.1"
    assert dist.get_rank() == layout.rank and dist.get_world_size() == layout.world_size
    t = torch.ones(2)
    ds_comm.all_reduce(t)
    assert torch.equal(t, torch.full((2,), float(layout.world_size)))
    ds_comm.destroy_process_group()
    return s.source.value


def test_env_and_slurm_discovery_real_processes():
    results = run_distributed(_env_then_slurm, 2, backend=None, args=(free_port(),), timeout=120)
    assert results == ["slurm", "slurm"]


def test_timeout_and_missing_env_errors(monkeypatch):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(DiscoveryError, match="MASTER_PORT"):
        ds_comm.init_distributed(
            dist_backend="gloo",
            env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x"},
        )
    with pytest.raises(ValueError, match="timeout=-1"):
        ds_comm.init_distributed(
            dist_backend="gloo",
            timeout=-1,
            env={**dict.fromkeys(["RANK", "LOCAL_RANK"], "0"), "WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
        )  # fmt: skip
    assert not dist.is_initialized()
