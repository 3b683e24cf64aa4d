"""Ranks started by a launcher whose script never destroys the group (most scripts written for
DeepSpeed): the group init_distributed made is torn down at exit, after a bounded barrier, so a
clean run exits 0 on every rank and a failing rank still fails the job at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

_CLEAN = """
import torch, torch.distributed as dist, ds_comm
ds_comm.init_distributed(dist_backend="gloo")
t = torch.ones(4)
dist.all_reduce(t)
assert t.tolist() == [2.0] * 4
print("rank", dist.get_rank(), "done")
"""

_ONE_FAILS = """
import torch.distributed as dist, ds_comm
ds_comm.init_distributed(dist_backend="gloo")
if dist.get_rank() == 1:
    raise RuntimeError("rank 1 fails on purpose")
print("rank 0 done")
"""


def _launch(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", str(script)]  # fmt: skip
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_clean_runs_without_destroy_exit_0(tmp_path: Path) -> None:
    # the abort this prevents came in a fraction of runs: several runs, every one clean
    for _ in range(4):
        run = _launch(tmp_path, _CLEAN)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "terminate called" not in run.stderr
        assert run.stdout.count("done") == 2, run.stdout


def test_a_failing_rank_fails_the_job_without_waiting_for_the_exit_barrier(tmp_path: Path) -> None:
    import ds_comm

    t0 = time.monotonic()
    run = _launch(tmp_path, _ONE_FAILS)
    elapsed = time.monotonic() - t0
    assert run.returncode != 0
    assert "rank 1 fails on purpose" in run.stderr
    # rank 1 skips the barrier; rank 0's barrier ends when rank 1's connections close
    assert elapsed < ds_comm.EXIT_BARRIER_S, elapsed


def test_a_script_that_destroys_the_group_itself_is_left_alone(tmp_path: Path) -> None:
    run = _launch(tmp_path, _CLEAN + "ds_comm.destroy_process_group()\nprint('destroyed')\n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("destroyed") == 2


# torch.distributed.nn.functional binds `group=group.WORLD` defaults when imported, which
# torch.optim's first optimizer does (through torch._dynamo), usually after init: those defaults
# kept the group object, so destroying it left its gloo threads running into interpreter
# finalization, where a worker dropping a finished work aborted the process now and then (-6,
# "terminate called without an active exception", ds-zero's README example on a loaded CI
# host). The group object dying is what joins those threads; the tests check that it dies.
_LATE_IMPORT = """
import atexit, os, weakref
import torch, torch.distributed as dist, ds_comm
refs = []
say = lambda line: os.write(1, f"{line}\\n".encode())  # one write: the ranks share stdout
# registered first, so it runs after ds_comm's own exit hook
atexit.register(lambda: say(f"group alive at exit: {refs[0]() is not None}"))
ds_comm.init_distributed(dist_backend="gloo")
import torch.distributed.nn.functional  # after init, as the first torch optimizer does
refs.append(weakref.ref(dist.group.WORLD))
t = torch.ones(4)
dist.all_reduce(t)
"""


def test_destroy_process_group_frees_the_group_torch_modules_captured(tmp_path: Path) -> None:
    run = _launch(
        tmp_path,
        _LATE_IMPORT + "ds_comm.destroy_process_group()\n"
        "say(f'group alive after destroy: {refs[0]() is not None}')\n",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("group alive after destroy: False") == 2, run.stdout


def test_the_exit_teardown_frees_the_group_torch_modules_captured(tmp_path: Path) -> None:
    run = _launch(tmp_path, _LATE_IMPORT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("group alive at exit: False") == 2, run.stdout
