"""The harness's own tests: success at several world sizes, failures reported with the failing
rank's traceback, hangs killed with every stack printed, and no process left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from ds_comm.testing import (
    DistributedTestError,
    DistributedTimeout,
    distributed_test,
    run_distributed,
)

pytest_plugins = ["ds_comm.testing.pytest_plugin"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its table entry remains


def _rank_sum(scale: int) -> tuple[int, int, float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1) * scale])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


# 1 and 2 ranks here: every 4-rank test of this package starts its ranks by run_distributed
@pytest.mark.parametrize("world_size", [1, 2])
def test_world_sizes_all_reduce(world_size: int) -> None:
    results = run_distributed(_rank_sum, world_size, args=(3,))
    expected = 3.0 * world_size * (world_size + 1) / 2
    assert results == [(r, world_size, expected) for r in range(world_size)]


def _raise_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom from the second rank")
    dist.barrier()  # rank 0 blocks here until the harness kills it


def test_raise_reports_that_ranks_traceback() -> None:
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank_one, 2, timeout=60)
    msg = str(info.value)
    assert not isinstance(info.value, DistributedTimeout)
    # rank 0's barrier may fail too (rank 1's exit closes its connections) before the
    # supervisor looks: then both are reported, rank 1 as the first failure
    assert re.search(r"rank\(s\) \[1(, 0)?\] of 2 failed, rank 1 first", msg), msg
    assert "rank 1: raised" in msg
    assert "ValueError: boom from the second rank" in msg
    assert "_raise_on_rank_one" in msg  # the frame of the failing function is in the traceback


def _exit_hard() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        os._exit(7)
    dist.barrier()


def test_rank_that_dies_without_traceback_is_reported() -> None:
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_exit_hard, 2, timeout=60)
    assert "rank 0: died (exit code 7)" in str(info.value)


def _hang_here_forever() -> None:
    while True:
        time.sleep(0.1)


def _hang_on_rank_zero(pid_dir: str) -> None:
    import torch.distributed as dist

    with open(os.path.join(pid_dir, f"pid{dist.get_rank()}"), "w") as f:
        f.write(str(os.getpid()))
    if dist.get_rank() == 0:
        _hang_here_forever()
    dist.barrier()


def test_hang_is_killed_at_timeout_with_stacks(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTimeout) as info:
        # 12 s: both ranks must be in their hang by then (spawning and importing torch take a
        # few seconds, more on a loaded 2-core machine), or the stacks show start-up instead
        run_distributed(_hang_on_rank_zero, 2, args=(str(tmp_path),), timeout=12)
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert elapsed < 12 + 15, f"the harness took {elapsed:.1f} s to stop a 12 s test"
    assert "timed out after 12 s" in msg
    assert "_hang_here_forever" in msg  # rank 0's stack, written by faulthandler
    assert "barrier" in msg  # rank 1's stack: blocked in the collective
    for r in range(2):
        pid = int((tmp_path / f"pid{r}").read_text())
        assert not _alive(pid), f"rank {r} (pid {pid}) survived the timeout"


def _start_grandchild_then_fail(pid_dir: str) -> None:
    import torch.distributed as dist

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(pid_dir, f"grandchild{dist.get_rank()}"), "w") as f:
        f.write(str(child.pid))
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("fail after starting a child process")
    dist.barrier()


def test_no_process_survives_a_failure(tmp_path) -> None:
    with pytest.raises(DistributedTestError):
        run_distributed(_start_grandchild_then_fail, 2, args=(str(tmp_path),), timeout=60)
    deadline = time.monotonic() + 5
    pids = [int((tmp_path / f"grandchild{r}").read_text()) for r in range(2)]
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a process started by a rank outlived the test"


def test_local_function_is_refused_with_advice() -> None:
    def local() -> None:
        pass

    with pytest.raises(TypeError, match="module-level"):
        run_distributed(local, 2)


# 1 and 2 ranks: the single- and multi-rank paths; every 4-rank test of this package runs
# through the same decorator
@distributed_test(world_size=[1, 2])
def test_decorator_runs_body_on_every_rank(tmp_path, world_size) -> None:
    import torch
    import torch.distributed as dist

    assert dist.get_world_size() == world_size
    assert os.environ["RANK"] == str(dist.get_rank())
    (tmp_path / f"seen{dist.get_rank()}").write_text("x")
    dist.barrier()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"seen{r}" for r in range(world_size)]
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [world_size, world_size]


@distributed_test(world_size=2, backend=None)
def test_decorator_without_process_group_gives_env() -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert var in os.environ, var
    dist.init_process_group("gloo")  # env:// with the harness's free port
    dist.barrier()
    dist.destroy_process_group()


def _debug_level() -> str:
    import torch.distributed as dist

    return str(dist.get_debug_level())


def test_env_reaches_torch_import_time_settings() -> None:
    # torch reads TORCH_DISTRIBUTED_DEBUG when torch.distributed is imported, which a rank does
    # (through ds_comm) before the harness applies ``env``; the harness must re-read it.
    (level,) = run_distributed(_debug_level, 1, env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"})
    assert level.endswith("DETAIL"), level


def test_fixture_form(dist_run) -> None:
    results = dist_run(_rank_sum, 2, args=(1,))
    assert [r[2] for r in results] == [3.0, 3.0]
