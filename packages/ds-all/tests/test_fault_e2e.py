"""Fault tolerance end to end with real processes (gloo, CPU, deterministic), one trial of each
case; benchmarks/fault/run_fault_trials.py runs the 10-trial version for the README table.

1. SIGKILL to a rank of a ``ds-launch --max_restarts`` job with auto-resume: the job restarts,
   resumes from the newest complete checkpoint, and every loss equals the uninterrupted run's
   bit for bit (re-run steps included).
2. A rank that stops taking part: every rank exits non-zero within timeout + 30 s, the message
   names the stalled rank and the collective.
3. SIGTERM to ds-launch with save_on_signal: every rank saves and exits 0; the next launch
   resumes from that checkpoint and finishes with the reference curve.
4. ZeRO-3 with a module called twice on one rank: an error naming the module, before the
   collective timeout.
"""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fault_scripts"))
import experiments as ex  # noqa: E402

STEPS = 8
# Each step also sleeps this long (losses unchanged), so that a kill or SIGTERM sent after step k
# lands before the run ends even on a loaded machine: with tiny steps the whole run could finish
# first, and the trial would then race the end of training instead of testing the resume.
SLOW = ["--step_sleep", "0.4"]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The stall and ZeRO-3 experiments mostly wait (for the 30 s timeout, for the watchdog),
    so they run in the background while the launcher experiments run in the foreground."""
    pool = ThreadPoolExecutor(2)
    futures: dict[str, Future] = {
        "stall": pool.submit(ex.stall_trial, tmp_path_factory.mktemp("stall"), stall_rank=1,
                             stall_step=2, timeout_s=30.0),
        "diverge": pool.submit(ex.diverge_trial, tmp_path_factory.mktemp("diverge"), rank=0,
                               step=2, timeout_s=30.0),
    }  # fmt: skip
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, background):
    out = tmp_path_factory.mktemp("reference")
    run = ex.reference(out, steps=STEPS)
    assert run["rc"] == 0, (out / "launcher.log").read_text(errors="replace")
    assert all(len(c) == STEPS for c in run["curve"].values())
    return run["curve"]


def test_sigkill_restart_resumes_bitwise(tmp_path, reference):
    rng = random.Random(12)  # a fixed draw, so a failure reproduces
    rank, step, delay = rng.randrange(2), rng.randint(3, STEPS - 2), rng.uniform(0.0, 0.3)
    trial = ex.kill_trial(tmp_path, reference, rank, step, delay, steps=STEPS, extra=SLOW)
    assert trial["rc"] == 0, (tmp_path / "launcher.log").read_text()
    assert trial["launches"] == 2 and trial["resumed_from"] is not None, trial
    assert trial["identical"], trial


def test_sigterm_saves_exits_0_and_next_launch_resumes(tmp_path, reference):
    trial = ex.sigterm_trial(tmp_path, reference, at_step=3, steps=STEPS, extra=SLOW)
    assert trial["rank_exit_codes"] == {0: 0, 1: 0}, (tmp_path / "launcher.log").read_text()
    assert trial["checkpoints"] and trial["resumed_from"] == trial["checkpoints"][-1]
    assert trial["resumed_at_step"] >= 4  # saved at the boundary after the signal
    assert trial["second_launch_rc"] == 0
    assert trial["identical"], trial


def test_stalled_rank_is_named_and_every_rank_exits(background):
    trial = background["stall"].result()
    logs = trial["logs"]
    assert all(c not in (None, 0) for c in trial["exit_codes"].values()), trial["exit_codes"]
    assert all(t is not None and t <= 30.0 + 30.0 for t in trial["exit_after_stall_s"].values())
    survivor = logs[0]
    assert "[ds_all] rank 0: stalled rank(s): 1" in survivor, survivor
    assert "rank 0 is in collective #" in survivor  # the collective it waited in, by number
    assert "finish_reduce" in survivor or "torch.distributed." in survivor  # and by call site
    assert "never entered it" in survivor and "time.sleep(3600)" in survivor
    assert "stalled rank(s): 1" in logs[1]  # the stalled rank says why it stops, too


def test_zero3_divergent_control_flow_names_the_module(background):
    trial = background["diverge"].result()
    assert all(c not in (None, 0) for c in trial["exit_codes"].values()), trial
    # found by the watchdog from the module call counts, well before the 30 s timeout
    assert all(t is not None and t < 30.0 for t in trial["exit_after_divergence_s"].values())
    text = "\n".join(trial["logs"].values())
    assert "module 'blocks.1' ran 2 time(s) on rank 0, 1 time(s) on rank 1" in text, text
