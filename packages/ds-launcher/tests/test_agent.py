"""Tier 1: the agent argv round trip (no flag can be dropped on the multi-node path)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_launcher import LauncherError
from ds_launcher._agent import AgentCall, agent_argv, mpi_rank_env, parse_agent_argv
from ds_launcher._plan import NodePlan, Program, World, rank_env

_hosts = st.lists(
    st.from_regex(r"[a-z][a-z0-9\-]{0,10}", fullmatch=True), min_size=1, max_size=4, unique=True
)


@st.composite
def _calls(draw):
    hosts = draw(_hosts)
    world = World(tuple((h, tuple(draw(st.sets(st.integers(0, 7), min_size=1)))) for h in hosts))
    program = Program(
        script=draw(st.text(min_size=1).filter(lambda s: "\x00" not in s)),
        args=tuple(draw(st.lists(st.text().filter(lambda s: "\x00" not in s), max_size=5))),
        module=draw(st.booleans()),
        no_python=draw(st.booleans()),
        python="/usr/bin/python3",
    )
    plan = NodePlan(
        world=world,
        master_addr=draw(st.sampled_from(["10.0.0.1", "node-a"])),
        master_port=draw(st.integers(1, 65535)),
        program=program,
        visible_var=draw(st.sampled_from([None, "CUDA_VISIBLE_DEVICES"])),
        log_dir=draw(st.sampled_from([None, "/logs dir"])),
        bind_cores_to_rank=draw(st.booleans()),
        bind_core_list=draw(st.sampled_from([None, "0-3,8"])),
        term_timeout=draw(st.floats(0.1, 60)),
        rank_timeout=draw(st.one_of(st.none(), st.floats(0.001, 1e6))),
    )
    return AgentCall(
        plan,
        node_rank=draw(st.sampled_from([None, 0])),
        node_host=draw(st.sampled_from([None, hosts[0]])),
        watch_stdin=draw(st.booleans()),
        from_mpi_env=draw(st.booleans()),
    )


@given(_calls())
def test_agent_argv_round_trip(call):
    argv = agent_argv(call)
    assert argv[:4] == ["/usr/bin/python3", "-u", "-m", "ds_launcher._agent_main"]
    assert parse_agent_argv(argv[4:], python="/usr/bin/python3") == call


def test_rank_env_contract():
    world = World((("a", (0, 1)), ("b", (2, 3, 5))))
    plan = NodePlan(world, "10.1.1.1", 1234, Program("t.py"))
    env = rank_env(plan, 1, 2)
    assert env["RANK"] == "4" and env["LOCAL_RANK"] == "2" and env["WORLD_SIZE"] == "5"
    assert env["LOCAL_WORLD_SIZE"] == "3" and env["NODE_RANK"] == "1"
    assert env["MASTER_ADDR"] == "10.1.1.1" and env["MASTER_PORT"] == "1234"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
             "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
            ("3", "1", "4", "2"),
        ),
        (
            {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"},
            ("2", "0", "4", "2"),
        ),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, ("1", "1", "4", "2")),
    ],
)  # fmt: skip
def test_mpi_rank_env_from_openmpi_mpich_slurm(environ, expected):
    world = World((("a", (0, 1)), ("b", (0, 1))))
    env = mpi_rank_env(environ, world)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == expected


def test_mpi_rank_env_errors():
    world = World((("a", (0, 1)),))
    with pytest.raises(LauncherError, match="no MPI/SLURM rank variables"):
        mpi_rank_env({}, world)
    with pytest.raises(LauncherError, match="has 3 processes but the hostfile selection has 2"):
        mpi_rank_env({"PMI_RANK": "0", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, world)
