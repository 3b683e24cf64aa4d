"""Tier 1: rank-layout discovery from launcher environments (pure functions)."""

import pytest

from ds_comm import DiscoveryError, Source, discover, first_slurm_host
from ds_comm._discovery import from_slurm_env, from_torchrun_env

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29501",
}


def test_torchrun_env():
    d = discover(TORCHRUN)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == (
        3, 8, 1, "10.0.0.5", 29501,
    )  # fmt: skip
    assert d.source is Source.ENV
    assert d.as_environ() == TORCHRUN


def test_torchrun_env_takes_precedence_over_slurm_and_mpi():
    env = {**TORCHRUN, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert discover(env).source is Source.ENV


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"])
def test_incomplete_torchrun_env_names_missing(missing):
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(DiscoveryError, match=missing):
        discover(env)


def test_bad_values():
    with pytest.raises(DiscoveryError, match="RANK='x' is not an integer"):
        from_torchrun_env({**TORCHRUN, "RANK": "x"})
    with pytest.raises(DiscoveryError, match=r"rank 8 is outside \[0, 8\)"):
        from_torchrun_env({**TORCHRUN, "RANK": "8"})
    with pytest.raises(DiscoveryError, match="not a TCP port"):
        from_torchrun_env({**TORCHRUN, "MASTER_PORT": "70000"})


def test_no_launcher_is_an_error_that_names_the_variables():
    with pytest.raises(DiscoveryError) as e:
        discover({})
    msg = str(e.value)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE"):
        assert var in msg


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node1", "node1"),
        ("gpu[07-09,12],cpu1", "gpu07"),
        ("a-[3,5-6]", "a-3"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("h1,h2", "h1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_first_slurm_host_errors():
    with pytest.raises(DiscoveryError, match="unclosed"):
        first_slurm_host("gpu[01-02")
    with pytest.raises(DiscoveryError, match="empty"):
        first_slurm_host("  ")


def test_slurm_env():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-06]",
    }
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == (
        5, 8, 1, "gpu03", 29500,
    )  # fmt: skip
    assert d.source is Source.SLURM
    d2 = from_slurm_env({**env, "MASTER_PORT": "1234", "MASTER_ADDR": "head"})
    assert (d2.master_addr, d2.master_port) == ("head", 1234)


def test_incomplete_slurm_env_names_missing():
    with pytest.raises(DiscoveryError, match="SLURM_NTASKS.*SLURM_JOB_NODELIST"):
        discover({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"})


def test_mpi_marker_without_discovery_falls_through():
    # auto_mpi_discovery=False: an mpirun environment alone is not a layout.
    with pytest.raises(DiscoveryError, match="no launcher environment"):
        discover({"OMPI_COMM_WORLD_SIZE": "2"}, auto_mpi_discovery=False)


def test_master_vars_alone_do_not_mean_torchrun():
    env = {"MASTER_ADDR": "head", "MASTER_PORT": "2000", "SLURM_PROCID": "1",
           "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}  # fmt: skip
    d = discover(env)
    assert d.source is Source.SLURM and (d.master_addr, d.master_port) == ("head", 2000)
