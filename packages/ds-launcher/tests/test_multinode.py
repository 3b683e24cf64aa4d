"""Real multi-node launches: a private sshd on loopback plays two hosts; pdsh and mpirun too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    SCRIPTS,
    free_port,
    launcher_env,
    read_pids,
    require_tool,
    run_launcher,
    wait_gone,
)
from test_local import check_injection, nasty_args, nasty_env_file


def _gloo_records(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in out.glob("rank_*.json")}


def _two_nodes(tmp_path: Path, slots: int) -> None:
    (tmp_path / "hostfile").write_text(f"node-a slots={slots}\nnode-b slots={slots}\n")


def _common(port: int | None = None) -> list[str]:
    return [
        "-H",
        "hostfile",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
    ]


def test_ssh_two_nodes_two_slots_gloo_allreduce(sshd, tmp_path):
    _two_nodes(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        [
            *_common(),
            "--launcher_args",
            sshd.ssh_args,
            str(SCRIPTS / "allreduce_check.py"),
            str(out),
        ],
        tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "via ssh" in res.stderr
    records = _gloo_records(out)
    assert sorted(records) == [0, 1, 2, 3]
    for rank, rec in records.items():
        assert rec["rank"] == rank and rec["world_size"] == 4 and rec["sum"] == 6.0
        env = rec["env"]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(rank % 2) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == str(rank // 2)
    assert wait_gone(read_pids(out), timeout=2) == []


def test_ssh_injection_arrives_byte_identical(sshd, tmp_path):
    _two_nodes(tmp_path, 1)
    out, canary = tmp_path / "out", tmp_path / "canary"
    out.mkdir()
    env_text, expected = nasty_env_file(canary)
    (tmp_path / ".ds_env").write_text(env_text)  # found in the working directory
    args = nasty_args(canary)
    # ssh starts remote commands with a clean environment: NCCL_* and PYTHON* arrive only
    # because ds-launch exports them; other launcher variables stay behind.
    env = launcher_env(
        NCCL_DEBUG="INFO $(touch canary)", PYTHONFAULTHANDLER="1", DS_TEST_NOT_EXPORTED="1"
    )
    res = run_launcher(
        [*_common(), "--launcher_args", sshd.ssh_args, str(SCRIPTS / "record.py"), str(out), *args],
        tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    expected.update(NCCL_DEBUG="INFO $(touch canary)", PYTHONFAULTHANDLER="1")
    check_injection(out, canary, args, expected, ranks=2)
    assert not (tmp_path / "canary").exists()
    assert all("DS_TEST_NOT_EXPORTED" not in rec["env"] for rec in _gloo_records(out).values())


def test_ssh_master_addr_defaults_to_the_first_hosts_address(sshd, tmp_path):
    """As in DeepSpeed: the first address `hostname -I` prints on the first host (node-a is
    this machine), not the hostfile's name, which may be an ssh alias no rank can resolve."""
    _two_nodes(tmp_path, 1)
    out = tmp_path / "out"
    out.mkdir()
    local = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True)
    expected = local.stdout.split()[0] if local.stdout.split() else "node-a"
    res = run_launcher(
        ["-H", "hostfile", "--launcher_args", sshd.ssh_args, str(SCRIPTS / "record.py"), str(out)],
        tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    records = _gloo_records(out)
    assert sorted(records) == [0, 1]
    for rec in records.values():
        assert bytes.fromhex(rec["env"]["MASTER_ADDR"]).decode() == expected
        assert bytes.fromhex(rec["env"]["MASTER_PORT"]).decode() == "29500"
    assert f"MASTER_ADDR={expected} MASTER_PORT=29500" in res.stderr


def test_ssh_fail_fast_stops_both_nodes(sshd, tmp_path):
    _two_nodes(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        [*_common(), "--launcher_args", sshd.ssh_args, str(SCRIPTS / "fail_one.py"), str(out)],
        tmp_path,
        timeout=60,
    )
    assert res.returncode == 3, res.stdout + res.stderr
    pids = read_pids(out)
    assert len(pids) == 4
    assert wait_gone(pids, timeout=5) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_launcher_reaches_the_ranks_of_every_node(sshd, tmp_path, sig):
    _two_nodes(tmp_path, 1)
    out = tmp_path / "out"
    out.mkdir()
    argv = [*_common(), "--launcher_args", sshd.ssh_args, str(SCRIPTS / "sleeper.py"), str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ds_launcher", *argv],
        cwd=tmp_path,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("pid_*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let the ranks install their SIGTERM handler
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err.decode()
    # Each node's agent turned the closed connection into a SIGTERM to its rank.
    assert sorted(p.name for p in out.glob("term_*")) == ["term_0", "term_1"]
    assert wait_gone(read_pids(out), timeout=5) == []


def test_pdsh_injection_and_fail_fast(sshd, tmp_path):
    require_tool("pdsh")
    env = launcher_env(PDSH_SSH_ARGS_APPEND=sshd.ssh_args)
    _two_nodes(tmp_path, 1)
    out, canary = tmp_path / "out", tmp_path / "canary"
    out.mkdir()
    env_text, expected = nasty_env_file(canary)
    (tmp_path / "inj.env").write_text(env_text)
    args = nasty_args(canary)
    res = run_launcher(
        [*_common(), "--launcher", "pdsh", "--env_file", "inj.env", str(SCRIPTS / "record.py"),
         str(out), *args],
        tmp_path,
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    check_injection(out, canary, args, expected, ranks=2)

    _two_nodes(tmp_path, 2)
    out = tmp_path / "out2"
    out.mkdir()
    res = run_launcher(
        [*_common(), "--launcher", "pdsh", str(SCRIPTS / "fail_one.py"), str(out)],
        tmp_path,
        env=env,
        timeout=60,
    )
    assert res.returncode == 3, res.stdout + res.stderr
    assert wait_gone(read_pids(out), timeout=5) == []


def test_openmpi_mpirun_gloo_allreduce(tmp_path):
    require_tool("mpirun")
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    out = tmp_path / "out"
    out.mkdir()
    env = launcher_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    extra = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    res = run_launcher(
        ["-H", "hostfile", "--launcher", "openmpi", "--launcher_args", extra,
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(SCRIPTS / "allreduce_check.py"), str(out)],
        tmp_path,
        env=env,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    records = _gloo_records(out)
    assert sorted(records) == [0, 1]
    for rank, rec in records.items():
        assert rec["sum"] == 1.0 and rec["world_size"] == 2
        assert rec["env"]["LOCAL_RANK"] == str(rank) and rec["env"]["LOCAL_WORLD_SIZE"] == "2"
        assert rec["env"]["NODE_RANK"] == "0"


def test_ssh_rank_timeout_names_the_hung_rank_and_its_host(sshd, tmp_path):
    """Rank 3 (on node-b) stops beating while the others beat on: node-b's agent stops its
    node and says which rank hung; ds-launch stops node-a and exits 124."""
    _two_nodes(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        [*_common(), "--launcher_args", sshd.ssh_args, "--rank_timeout", "1", "--term_timeout",
         "1", str(SCRIPTS / "hang.py"), str(out), "stop_beating"],
        tmp_path,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 124, res.stdout + res.stderr
    assert "rank 3 on host node-b made no progress" in res.stderr
    assert "since its last heartbeat (limit 1 s: --rank_timeout)" in res.stderr
    assert "node 1 (node-b) exited with code 124" in res.stderr
    pids = read_pids(out)
    assert len(pids) == 4 and wait_gone(pids, timeout=5) == []


def test_ssh_rank_timeout_catches_a_node_still_running_after_another_finished(sshd, tmp_path):
    """One rank per node: node-a's rank exits 0 after the collective, node-b's hangs. node-b's
    agent has no peer whose exit it could see, so ds-launch judges the node."""
    _two_nodes(tmp_path, 1)
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        [*_common(), "--launcher_args", sshd.ssh_args, "--rank_timeout", "1", "--term_timeout",
         "1", str(SCRIPTS / "hang.py"), str(out), "gloo"],
        tmp_path,
        timeout=90,
    )  # fmt: skip
    assert res.returncode == 124, res.stdout + res.stderr
    assert "node 1 (node-b) made no progress for 7." in res.stderr
    assert "since node 0 (node-a) exited with code 0 (limit 7 s: --rank_timeout 1 plus 6 s" in (
        res.stderr
    )
    pids = read_pids(out)
    assert len(pids) == 2 and wait_gone(pids, timeout=5) == []
