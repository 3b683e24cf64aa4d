"""The CPU optimizer's thread count: explicit values, a launcher's OMP_NUM_THREADS, and each
local rank's share of the cores (torchrun's OMP_NUM_THREADS=1 default is not a request)."""

from __future__ import annotations

import os

import pytest

import ds_offload
from ds_offload import OffloadStepper, cpu_optimizer_threads

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity (Linux)"
)


@pytest.fixture
def sixteen_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                 "SLURM_NTASKS_PER_NODE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_takes_every_usable_core(sixteen_cores):
    assert cpu_optimizer_threads() == 16


@pytest.mark.parametrize("local, want", [(1, 16), (2, 8), (3, 5), (32, 1)])
def test_local_ranks_share_the_cores(sixteen_cores, local, want):
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", str(local))
    assert cpu_optimizer_threads() == want


@pytest.mark.parametrize(
    "var", ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"]
)
def test_mpi_and_slurm_launches_share_the_cores_too(sixteen_cores, var):
    sixteen_cores.setenv(var, "4")
    assert cpu_optimizer_threads() == 4
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's / ds-launch's name comes first
    assert cpu_optimizer_threads() == 8


def test_torchruns_default_of_one_thread_is_not_a_request(sixteen_cores):
    sixteen_cores.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for several processes
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_optimizer_threads() == 8


def test_a_launchers_share_is_kept_and_capped_at_the_usable_cores(sixteen_cores):
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "2")
    sixteen_cores.setenv("OMP_NUM_THREADS", "6")  # e.g. ds-launch --bind_cores_to_rank
    assert cpu_optimizer_threads() == 6
    sixteen_cores.setenv("OMP_NUM_THREADS", "64")
    assert cpu_optimizer_threads() == 16


def test_unreadable_environment_falls_back_to_the_cores(sixteen_cores):
    sixteen_cores.setenv("OMP_NUM_THREADS", "auto")
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "")
    assert cpu_optimizer_threads() == 16


def test_an_explicit_count_wins(sixteen_cores):
    sixteen_cores.setenv("OMP_NUM_THREADS", "6")
    assert cpu_optimizer_threads(3) == 3
    with pytest.raises(ValueError, match="offload_optimizer.num_threads must be >= 0"):
        cpu_optimizer_threads(-1)


def test_the_stepper_takes_the_sections_num_threads_then_its_argument(sixteen_cores):
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "4")
    assert OffloadStepper({"device": "cpu", "overlap": False}).num_threads == 4
    # overlapped (the default): one core of the share stays with the thread launching kernels
    assert OffloadStepper({"device": "cpu"}).num_threads == 3
    assert OffloadStepper({"device": "cpu", "num_threads": 2}).num_threads == 2
    assert OffloadStepper({"device": "cpu", "num_threads": 2}, num_threads=5).num_threads == 5


def test_the_config_key_is_validated():
    cfg = ds_offload.OffloadOptimizerConfig.model_validate({"device": "cpu", "num_threads": 3})
    assert cfg.to_options().num_threads == 3
    with pytest.raises(ValueError, match="num_threads"):
        ds_offload.OffloadOptimizerConfig.from_dict(
            {"device": "cpu", "num_threads": -2}, "zero_optimization.offload_optimizer"
        )
    with pytest.raises(ValueError, match="offload_optimizer.num_threads"):
        ds_offload.OffloadOptimizerOptions(device="cpu", num_threads=-1)
