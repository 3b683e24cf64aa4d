"""The watchdog on 2 gloo ranks (tier 2): its diagnosis names the rank that never entered a
collective and where that rank is; an abort notice stops the other ranks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from ds_comm.testing import distributed_test


def _watchdog(exits: list[int]):
    from ds_all.fault import Watchdog, groups_of, open_store

    return Watchdog(
        open_store(5.0), dist.get_rank(), dist.get_world_size(), groups_of(None), timeout_s=60.0,
        interval_s=0.2, progress=lambda: {"step": 7, "micro": 0}, exit_fn=exits.append,
    )  # fmt: skip


def _late_rank_1() -> None:
    time.sleep(3.0)  # stops taking part for a while, alive


@distributed_test(world_size=2, timeout=90)
def test_diagnosis_names_the_stalled_rank_and_abort_stops_the_others():
    exits: list[int] = []
    wd = _watchdog(exits)
    wd.start()
    dist.all_reduce(torch.ones(1))  # both ranks pass collective #1
    if dist.get_rank() == 0:
        found: list[str] = []

        def probe() -> None:
            time.sleep(1.5)
            found.append(wd.diagnose("the test's all_reduce"))

        t = threading.Thread(target=probe)
        t.start()
        dist.all_reduce(torch.ones(1))  # #2: rank 1 joins 3 s late
        t.join()
        msg = found[0]
        assert msg.startswith("stalled rank(s): 1\n"), msg
        assert "rank 0 is in collective #2 of the default group: the test's all_reduce" in msg
        assert "rank 1 (pid" in msg and "never entered it (its last collective is #1)" in msg
        assert "step 7" in msg and "_late_rank_1" in msg and "time.sleep(3.0)" in msg, msg
        assert "waiting in the collective: rank(s) 0" in msg
    else:
        _late_rank_1()
        dist.all_reduce(torch.ones(1))
    dist.barrier()
    assert exits == []
    # the abort notice: rank 0 fails, rank 1's watchdog thread acts on it
    if dist.get_rank() == 0:
        wd.fail("test failure", what="nothing")
        assert exits == [1]
    else:
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits == [1], "rank 1 did not act on the abort notice"
    dist.barrier()
    wd.stop()


_EXIT_WITHOUT_STOP = """
import datetime, sys, time
import torch.distributed as dist
from ds_all.fault import Watchdog

server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
client = dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False,
                       timeout=datetime.timedelta(seconds=5))
# interval 0: the thread is almost always inside a store call (C++, GIL released)
wd = Watchdog(dist.PrefixStore("t/", client), 0, 1, {}, timeout_s=60.0, interval_s=0.0,
              progress=lambda: {"step": 0, "micro": 0}, exit_fn=sys.exit)
wd.start()
time.sleep(0.05)
# the script ends without wd.stop() (or engine.close()), as DeepSpeed's examples do
"""


def test_script_ending_without_close_exits_0(tmp_path):
    """A daemon thread still in a store call at interpreter finalization aborts the process
    (status 134) unless the watchdog stops itself at exit."""
    script = tmp_path / "exit_without_stop.py"
    script.write_text(_EXIT_WITHOUT_STOP)
    for _ in range(3):
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
