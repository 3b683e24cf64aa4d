"""Tier 1: the commands each runner builds (slurm and mpich cannot run here: argv checked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds_launcher import LauncherError
from ds_launcher._agent import AGENT_MODULE
from ds_launcher._plan import NodePlan, Program, World
from ds_launcher._runners import (
    RunnerInput,
    mpich_command,
    openmpi_command,
    pdsh_members,
    remote_command,
    slurm_command,
    ssh_members,
)

NASTY = [
    "$(touch canary)",
    "`touch canary`",
    "a b",
    "it's",
    'say "hi"',
    "line1\nline2",
    "%n %h %%",
    "; touch canary",
    "$HOME",
    "\\",
    "",
    "-x",
]


def _input(nodes, launcher_args=(), args=("--lr", "0.1")):
    world = World(tuple((h, tuple(s)) for h, s in nodes))
    plan = NodePlan(world, "10.0.0.1", 29500, Program("train.py", tuple(args), python="/py"))
    return RunnerInput(plan, {"NCCL_X": "1"}, {"PATH": "/bin"}, "/work dir", tuple(launcher_args))


def test_remote_command_survives_a_posix_shell_byte_for_byte(tmp_path):
    """Run the exact string a remote sshd would hand to the login shell, through sh -c."""
    probe = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['V']]))"
    command = remote_command(
        [sys.executable, "-c", probe, *NASTY], {"V": "\n".join(NASTY)}, str(tmp_path)
    )
    out = subprocess.run(
        ["sh", "-c", command], cwd="/", capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [NASTY, "\n".join(NASTY)]
    assert not (tmp_path / "canary").exists() and not any(tmp_path.iterdir())
    # Single-quoted words, never values wrapped in double quotes.
    assert remote_command(["p", "a b"], {"K": "v $w"}, "/d") == "cd /d && exec env 'K=v $w' p 'a b'"


def test_ssh_argv_ends_options_before_the_host_and_stops_via_stdin():
    members = ssh_members(_input([("node-a", [0, 1]), ("node-b", [0, 1])], ["-F", "cfg"]))
    assert [m.argv[:4] for m in members] == [
        ["ssh", "-F", "cfg", "--"],
        ["ssh", "-F", "cfg", "--"],
    ]
    assert [m.argv[4] for m in members] == ["node-a", "node-b"]
    cmd = members[1].argv[5]
    assert cmd.startswith("cd '/work dir' && exec env NCCL_X=1 /py -u -m " + AGENT_MODULE)
    assert "--node_rank 1" in cmd and "--watch_stdin" in cmd
    assert cmd.endswith("-- train.py --lr 0.1")


def test_pdsh_runs_one_node_each_with_percent_escaped():
    members = pdsh_members(_input([("a", [0]), ("b", [0])], args=["50%n"]))
    argv = members[0].argv
    assert argv[:5] == ["pdsh", "-S", "-w", "a", argv[4]]
    assert "50%%n" in argv[4] and "--node_rank 0" in argv[4]
    assert members[0].env["PDSH_RCMD_TYPE"] == "ssh"


def test_openmpi_exports_by_name_and_runs_the_rank_shim():
    argv, env = openmpi_command(_input([("a", [0, 1]), ("b", [0, 1])], ["--oversubscribe"]))
    assert argv[:8] == [
        "mpirun",
        "-n",
        "4",
        "--host",
        "a:2,b:2",
        "--bind-to",
        "none",
        "--oversubscribe",
    ]
    assert argv[8:14] == ["-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "NCCL_X"]
    assert argv[14:18] == ["/py", "-u", "-m", AGENT_MODULE]
    assert "--from_mpi_env" in argv and argv[-3:] == ["train.py", "--lr", "0.1"]
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["NCCL_X"] == "1" and env["PATH"] == "/bin"


def test_mpich_uses_a_machinefile_and_passes_the_environment():
    argv, env, text = mpich_command(_input([("a", [0, 1, 2]), ("b", [0])]), "/tmp/mf")
    assert argv[:7] == ["mpiexec", "-n", "4", "-f", "/tmp/mf", "-genvall", "/py"]
    assert text == "a:3\nb:1\n"
    assert "--from_mpi_env" in argv and env["MASTER_PORT"] == "29500"


def test_slurm_srun_argv():
    argv, env = slurm_command(_input([("a", [0, 1]), ("b", [0, 1])], ["--partition=gpu"]))
    assert argv[:9] == [
        "srun",
        "--nodes=2",
        "--ntasks=4",
        "--ntasks-per-node=2",
        "--nodelist=a,b",
        "--distribution=block",
        "--export=ALL",
        "--partition=gpu",
        "/py",
    ]
    assert env["NCCL_X"] == "1"


def test_slurm_rejects_uneven_nodes_and_mpi_rejects_slot_subsets():
    with pytest.raises(LauncherError, match="same number of slots"):
        slurm_command(_input([("a", [0, 1]), ("b", [0])]))
    with pytest.raises(LauncherError, match=r"slots \[1, 3\] of 'a'"):
        openmpi_command(_input([("a", [1, 3])]))
