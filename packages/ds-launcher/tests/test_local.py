"""The local runner, run for real: rank contract, argument safety, fail-fast, signals, restarts."""

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
    launcher_env,
    read_pids,
    run_launcher,
    wait_gone,
)

from ds_launcher._cli import split_argv


def _records(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in out.glob("rank_*.json")}


def _env(record: dict, name: str) -> str | None:
    value = record["env"].get(name)
    return None if value is None else bytes.fromhex(value).decode()


def test_split_argv_gives_everything_after_the_script_to_the_script():
    argv = ["-H", "hf", "--num_gpus=2", "--module", "pkg.train", "--hostfile", "x", "--", "-y"]
    assert split_argv(argv) == (
        ["-Hhf", "--num_gpus=2", "--module"],
        ["pkg.train", "--hostfile", "x", "--", "-y"],
    )
    assert split_argv(["--no_ssh", "--", "-weird.py", "a"]) == (["--no_ssh"], ["-weird.py", "a"])
    # Values that look like options stay values.
    assert split_argv(["--launcher_args", "--oversubscribe", "-i", "-x", "t.py"]) == (
        ["--launcher_args=--oversubscribe", "-i-x"],
        ["t.py"],
    )


def test_every_rank_gets_the_contract_and_prefixed_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(["--num_gpus", "3", str(SCRIPTS / "record.py"), str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    records = _records(out)
    assert sorted(records) == [0, 1, 2]
    ports = set()
    for rank, rec in records.items():
        assert _env(rec, "RANK") == str(rank) and _env(rec, "LOCAL_RANK") == str(rank)
        assert _env(rec, "WORLD_SIZE") == "3" and _env(rec, "LOCAL_WORLD_SIZE") == "3"
        assert _env(rec, "MASTER_ADDR") == "127.0.0.1"
        ports.add(_env(rec, "MASTER_PORT"))
        assert f"[rank {rank}] recorded rank {rank}\n" in res.stdout
        assert rec["cwd"] == str(tmp_path)
    assert len(ports) == 1


def nasty_args(canary: Path) -> list[str]:
    return [
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"; touch {canary}",
        f"&& touch {canary} ||",
        "a b  c",
        "it's",
        'say "hi"',
        "line1\nline2\n",
        "%n %h %u %%",
        "$HOME ${PATH}",
        "back\\slash",
        "",
        "-x",
        "--hostfile",
        "*",
        "\u00fcn\u00efc\u00f6d\u00e9",
    ]


def nasty_env_file(canary: Path) -> tuple[str, dict[str, str]]:
    text = (
        f'INJ_RAW=$(touch {canary}) `touch {canary}` it\'s "q"\n'
        f"INJ_SINGLE='$(touch {canary}) \"dq\" a  b'\n"
        f'INJ_DOUBLE="multi\\nline $(touch {canary}) \\"q\\" it\'s"\n'
        "INJ_PERCENT=%n%h%%\n"
    )
    expected = {
        "INJ_RAW": f'$(touch {canary}) `touch {canary}` it\'s "q"',
        "INJ_SINGLE": f'$(touch {canary}) "dq" a  b',
        "INJ_DOUBLE": f'multi\nline $(touch {canary}) "q" it\'s',
        "INJ_PERCENT": "%n%h%%",
    }
    return text, expected


def check_injection(out: Path, canary: Path, args: list[str], expected_env: dict, ranks: int):
    records = _records(out)
    assert sorted(records) == list(range(ranks))
    for rec in records.values():
        assert [bytes.fromhex(a) for a in rec["argv"]] == [os.fsencode(a) for a in args]
        for name, value in expected_env.items():
            assert bytes.fromhex(rec["env"][name]) == value.encode()
    assert not canary.exists()


def test_injection_local_runner(tmp_path):
    out, canary = tmp_path / "out", tmp_path / "canary"
    out.mkdir()
    env_text, expected = nasty_env_file(canary)
    (tmp_path / "nasty.env").write_text(env_text)
    args = nasty_args(canary)
    res = run_launcher(
        ["--num_gpus", "2", "--env_file", "nasty.env", str(SCRIPTS / "record.py"), str(out), *args],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    check_injection(out, canary, args, expected, ranks=2)


@pytest.mark.parametrize(("how", "code"), [("exit3", 3), ("sigkill", 128 + signal.SIGKILL)])
def test_fail_fast_stops_every_rank(tmp_path, how, code):
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        ["--num_gpus", "4", str(SCRIPTS / "failing.py"), str(out), how], tmp_path, timeout=90
    )
    finished = time.time()
    assert res.returncode == code, res.stderr
    failed_at = float((out / "failed_at").read_text())
    assert finished - failed_at < 10, f"launcher took {finished - failed_at:.1f}s to exit"
    assert f"rank 1 exited with code {code}" in res.stderr
    pids = read_pids(out)
    assert len(pids) == 4
    assert wait_gone(pids, timeout=1) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_launcher_reaches_every_rank(tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ds_launcher",
            "--num_gpus",
            "3",
            str(SCRIPTS / "sleeper.py"),
            str(out),
        ],
        cwd=tmp_path,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list(out.glob("pid_*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let the ranks install their SIGTERM handler
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig
    assert sorted(p.name for p in out.glob("term_*")) == ["term_0", "term_1", "term_2"]
    assert wait_gone(read_pids(out), timeout=1) == []
    assert signal.Signals(sig).name in err.decode()


def test_max_restarts_restarts_the_group_on_a_fresh_port(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ["--num_gpus", "2", str(SCRIPTS / "flaky.py"), str(out)]
    res = run_launcher(["--max_restarts", "1", *args], tmp_path)
    assert res.returncode == 0, res.stderr
    ports = (out / "port_0").read_text().split()
    assert len(ports) == 2 and ports[0] != ports[1]
    assert (out / "port_1").read_text().split() == ports
    assert "restart 1 of 1" in res.stderr
    # Without restarts the same failure is final.
    (out / "failed_once").unlink()
    res = run_launcher(args, tmp_path)
    assert res.returncode == 1


def test_log_dir_module_and_no_python(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "job.py").write_text(
        "import os, sys\nprint('module rank', os.environ['RANK'], sys.argv[1:])\n"
    )
    res = run_launcher(
        ["--num_gpus", "2", "--log_dir", "logs", "--module", "mypkg.job", "x y"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank_{rank}.log").read_text()
        assert log == f"module rank {rank} ['x y']\n"
    res = run_launcher(
        ["--num_gpus", "2", "--no_python", "/bin/sh", "-c", 'echo "sh $RANK $0"', "arg0"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "[rank 1] sh 1 arg0\n" in res.stdout


def test_visible_devices_follow_the_selected_slots(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = launcher_env(DS_ACCELERATOR="cuda", CUDA_VISIBLE_DEVICES="4,5,6")
    res = run_launcher(
        ["--include", "localhost:1,2", str(SCRIPTS / "record.py"), str(out)], tmp_path, env=env
    )
    assert res.returncode == 0, res.stderr
    records = _records(out)
    assert sorted(records) == [0, 1]
    for rank, rec in records.items():
        assert _env(rec, "CUDA_VISIBLE_DEVICES") == "5,6"
        assert _env(rec, "LOCAL_RANK") == str(rank)


def _core_of(cpu: int) -> tuple[str, str] | int:
    """(socket, core id) of a CPU from sysfs, read here independently of the launcher."""
    topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return ((topo / "physical_package_id").read_text(), (topo / "core_id").read_text())
    except OSError:
        return cpu


def test_bind_cores_to_rank(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    if len({_core_of(c) for c in cores}) < 2:
        pytest.skip("needs 2 physical cores")
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        ["--num_gpus", "2", "--bind_cores_to_rank", str(SCRIPTS / "record.py"), str(out)], tmp_path
    )
    assert res.returncode == 0, res.stderr
    records = _records(out)
    shares = [records[rank]["affinity"] for rank in (0, 1)]
    for share, rec in zip(shares, records.values()):
        assert share and set(share) <= set(cores)
        assert _env(rec, "OMP_NUM_THREADS") == str(len(share))
        # One thread per physical core, as DeepSpeed binds.
        assert len({_core_of(c) for c in share}) == len(share)
    # No physical core (hyperthread siblings included) is shared by the two ranks.
    assert not {_core_of(c) for c in shares[0]} & {_core_of(c) for c in shares[1]}
    assert max(shares[0]) < min(shares[1])  # contiguous shares in rank order


def test_bind_core_list_pins_ranks_to_the_listed_cores(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    out = tmp_path / "out"
    out.mkdir()
    chosen = [cores[-1], cores[0]]
    # --bind_core_list alone turns binding on; the list's order decides which rank gets what.
    res = run_launcher(
        ["--num_gpus", "2", "--bind_core_list", ",".join(map(str, chosen)),
         str(SCRIPTS / "record.py"), str(out)],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    records = _records(out)
    assert [records[r]["affinity"] for r in (0, 1)] == [[chosen[0]], [chosen[1]]]
    assert {_env(rec, "OMP_NUM_THREADS") for rec in records.values()} == {"1"}
    # A user's OMP_NUM_THREADS is kept.
    res = run_launcher(
        ["--num_gpus", "1", "--bind_core_list", str(cores[0]), str(SCRIPTS / "record.py"),
         str(out)],
        tmp_path,
        env=launcher_env(OMP_NUM_THREADS="7"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert _env(_records(out)[0], "OMP_NUM_THREADS") == "7"


def test_env_files_from_home_and_working_directory_reach_every_rank(tmp_path):
    home, work, out = tmp_path / "home", tmp_path / "work", tmp_path / "out"
    for d in (home, work, out):
        d.mkdir()
    (home / ".deepspeed_env").write_text("FROM_HOME=deepspeed\nBOTH=home\n")
    (home / ".ds_env").write_text("HOME_OURS=1\n")
    (work / ".deepspeed_env").write_text("BOTH=cwd-deepspeed\nCWD_DS=yes\n")
    (work / ".ds_env").write_text("export BOTH='cwd ours'\n")
    env = launcher_env(HOME=str(home), NCCL_SOCKET_IFNAME="lo", PYTHONHASHSEED="7")
    res = run_launcher(["--num_gpus", "2", str(SCRIPTS / "record.py"), str(out)], work, env=env)
    assert res.returncode == 0, res.stderr
    records = _records(out)
    assert sorted(records) == [0, 1]
    for rec in records.values():
        assert _env(rec, "FROM_HOME") == "deepspeed" and _env(rec, "HOME_OURS") == "1"
        assert _env(rec, "CWD_DS") == "yes" and _env(rec, "BOTH") == "cwd ours"
        assert _env(rec, "NCCL_SOCKET_IFNAME") == "lo" and _env(rec, "PYTHONHASHSEED") == "7"


def test_no_ssh_starts_only_this_nodes_ranks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "hf").write_text("node-a slots=2\nnode-b slots=3\n")
    res = run_launcher(
        ["-H", "hf", "--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1",
         str(SCRIPTS / "record.py"), str(out)],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    records = _records(out)
    assert sorted(records) == [2, 3, 4]
    for rank, rec in records.items():
        assert _env(rec, "WORLD_SIZE") == "5" and _env(rec, "LOCAL_RANK") == str(rank - 2)
        assert _env(rec, "NODE_RANK") == "1" and _env(rec, "MASTER_PORT") == "29500"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-H", "hf_bad", "x.py"], "hf_bad:2: 'worker-1 slots=two'"),
        (["--num_gpus", "2"], "missing the script"),
        (["-i", "localhost", "-e", "localhost:0", "x.py"], "cannot be used together"),
        (["-H", "hf_two", "--launcher", "local", "x.py"], "--launcher local runs on this machine"),
        (["-H", "hf_two", "--no_ssh", "x.py"], "--no_ssh needs --node_rank"),
        (["-H", "hf_two", "-i", "worker-3", "x.py"], "names host 'worker-3'"),
        (["--env_file", "missing.env", "x.py"], "env file 'missing.env' does not exist"),
        (["--module", "--no_python", "x.py"], "cannot be used together"),
        (["-H", "hf_two", "--launcher_args", "'unclosed", "x.py"], "--launcher_args"),
        (["--launcher_args", "-v", "x.py"], "--launcher_args is for the ssh"),
        (["-i", "-oProxyCommand=x", "x.py"], "starts with '-'"),
        (["--master_port", "70000", "x.py"], "--master_port: expected a whole number from 1 to"),
        (["--num_gpu", "2", "x.py"], "unknown option '--num_gpu'; did you mean --num_gpus?"),
        (["-H", "hf_case", "x.py"], "hf_case:2: 'WORKER-0 slots=1': host 'WORKER-0' is listed"),
        (["-i", "localhost:0,0", "x.py"], "slot 0 is listed twice"),
        (["--master_addr", "bad host", "x.py"], "argument --master_addr: 'bad host' is neither"),
        (["--term_timeout", "-1", "x.py"], "argument --term_timeout: expected a finite number"),
        (["--bind_core_list", "100000", "x.py"], "names core(s) 100000 that this process cannot"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path, args, needle):
    (tmp_path / "hf_bad").write_text("worker-0 slots=1\nworker-1 slots=two\n")
    (tmp_path / "hf_two").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    (tmp_path / "hf_case").write_text("worker-0 slots=1\nWORKER-0 slots=1\n")
    res = run_launcher(args, tmp_path)
    assert res.returncode == 2
    assert needle in res.stderr


def test_main_in_process_from_a_worker_thread(tmp_path, monkeypatch, capfdbinary):
    """The public main(argv) returns the exit code and works off the main thread too."""
    import threading

    from ds_launcher import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    (tmp_path / "job.py").write_text("import os, sys\nsys.exit(int(os.environ['RANK']) + 4)\n")
    codes = []
    t = threading.Thread(target=lambda: codes.append(main(["--num_gpus", "2", "job.py"])))
    t.start()
    t.join(timeout=60)
    assert codes in ([4], [5])  # whichever rank fails first decides
