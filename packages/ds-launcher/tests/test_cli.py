"""Tier 1: how the CLI resolves DeepSpeed's flags and defaults into a run (no processes)."""

from __future__ import annotations

import pytest

from ds_launcher import HostfileError, LauncherError
from ds_launcher import _cli as cli


def _resolve(argv: list[str], environ: dict[str, str] | None = None) -> cli._Resolved:
    options, program = cli.split_argv(argv)
    return cli.resolve(cli.build_parser().parse_args(options), program, environ or {})


@pytest.fixture
def no_default_hostfile(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_HOSTFILE", str(tmp_path / "absent" / "hostfile"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_default_hostfile_is_used_when_it_exists(tmp_path, monkeypatch, no_default_hostfile):
    """DeepSpeed reads /job/hostfile unless -H is given."""
    default = tmp_path / "job" / "hostfile"
    default.parent.mkdir()
    default.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    monkeypatch.setattr(cli, "DEFAULT_HOSTFILE", str(default))
    r = _resolve(["train.py"], {"DS_ACCELERATOR": "cpu"})
    assert r.plan.world.hosts == ["worker-0", "worker-1"] and r.plan.world.size == 4
    # Multi-node defaults: the ssh runner, the first host as master, DeepSpeed's port.
    assert r.runner == "ssh"
    assert (r.plan.master_addr, r.plan.master_port) == ("worker-0", 29500)
    # An explicit -H wins over the default file.
    (tmp_path / "mine").write_text("worker-7 slots=1\n")
    assert _resolve(["-H", "mine", "train.py"]).plan.world.hosts == ["worker-7"]


def test_without_any_hostfile_this_machine_runs_num_gpus_processes(no_default_hostfile):
    r = _resolve(["--num_gpus", "3", "train.py"], {"DS_ACCELERATOR": "cpu"})
    assert r.runner == "local" and r.plan.world.nodes == (("localhost", (0, 1, 2)),)
    assert r.plan.master_addr == "127.0.0.1" and 1 <= r.plan.master_port <= 65535
    assert _resolve(["train.py"], {"DS_ACCELERATOR": "cpu"}).plan.world.size == 1


def test_an_explicit_hostfile_that_is_missing_is_an_error(no_default_hostfile):
    with pytest.raises(HostfileError, match="'nope' does not exist"):
        _resolve(["-H", "nope", "train.py"])


def test_num_nodes_and_num_gpus_limit_the_hostfile_pool(tmp_path, no_default_hostfile):
    (tmp_path / "hf").write_text("a slots=4\nb slots=4\nc slots=4\n")
    r = _resolve(["-H", "hf", "--num_nodes", "2", "--num_accelerators", "3", "t.py"])
    assert r.plan.world.nodes == (("a", (0, 1, 2)), ("b", (0, 1, 2)))
    r = _resolve(["-H", "hf", "-e", "a@c:0,1", "t.py"])
    assert r.plan.world.nodes == (("b", (0, 1, 2, 3)), ("c", (2, 3)))


def test_no_ssh_runs_one_node_with_deepspeeds_port(tmp_path, no_default_hostfile):
    (tmp_path / "hf").write_text("a slots=2\nb slots=1\n")
    r = _resolve(["-H", "hf", "--no_ssh", "--node_rank", "1", "t.py"])
    assert (r.runner, r.node_rank) == ("local", 1)
    assert (r.plan.master_addr, r.plan.master_port) == ("a", 29500)
    with pytest.raises(LauncherError, match="--node_rank 2 is outside 0..1"):
        _resolve(["-H", "hf", "--no_ssh", "--node_rank", "2", "t.py"])
    with pytest.raises(LauncherError, match="only used with --no_ssh"):
        _resolve(["-H", "hf", "--node_rank", "0", "t.py"])


def test_program_flags_and_explicit_master(tmp_path, no_default_hostfile):
    r = _resolve(["--master_addr", "10.1.2.3", "--master_port", "1234", "--module", "pkg.m", "x"])
    assert (r.plan.master_addr, r.plan.master_port) == ("10.1.2.3", 1234)
    assert r.plan.program.argv()[-4:] == ["-u", "-m", "pkg.m", "x"]
    r = _resolve(["--no_python", "/bin/echo", "hi"])
    assert r.plan.program.argv() == ["/bin/echo", "hi"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--master_port", "0", "t.py"], "--master_port: expected a whole number from 1 to 65535, got 0"),
        (["--master_port", "65536", "t.py"], "got 65536"),
        (["--bind_core_list", "0-x", "t.py"], "--bind_core_list '0-x'"),
        (["--bind_core_list", "3-1", "t.py"], "runs backwards"),
        (["--max_restarts", "-1", "t.py"], "--max_restarts: expected a whole number of at least 0, got -1"),
    ],
)  # fmt: skip
def test_bad_values_are_caught_before_anything_starts(no_default_hostfile, argv, needle):
    with pytest.raises(LauncherError) as info:
        _resolve(argv, {"DS_ACCELERATOR": "cpu"})
    assert needle in str(info.value)


def test_launcher_names_are_case_insensitive_as_in_deepspeed(tmp_path, no_default_hostfile):
    (tmp_path / "hf").write_text("a slots=1\nb slots=1\n")
    assert _resolve(["-H", "hf", "--launcher", "PDSH", "t.py"]).runner == "pdsh"


def test_first_address_of_hostname_dash_i():
    assert cli.first_address("10.0.0.5 172.17.0.1 fd00::2 \n", "a", "ssh") == "10.0.0.5"
    assert cli.first_address("node-a: fd00::2 10.0.0.5\n", "node-a", "pdsh") == "fd00::2"
    assert cli.first_address("\n", "a", "ssh") is None
    assert cli.first_address("bash: hostname: not found\n", "a", "ssh") is None
