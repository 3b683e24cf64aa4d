"""--rank_timeout: the watchdog's rules in one process, then real launches of hanging ranks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import SCRIPTS, read_pids, run_launcher, wait_gone

from ds_launcher import HEARTBEAT_ENV, heartbeat
from ds_launcher._supervisor import HANG_EXIT_CODE
from ds_launcher._watchdog import ProgressWatchdog

HANG = str(SCRIPTS / "hang.py")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _beat(path: Path, ns: int) -> None:
    path.touch()
    os.utime(path, ns=(ns, ns))


def test_ranks_that_never_beat_are_not_judged_while_all_run(tmp_path):
    clock = FakeClock()
    dog = ProgressWatchdog(2.0, [tmp_path / "a", None], clock)
    clock.now += 1000
    assert dog.poll([0, 1]) is None


def test_a_successful_exit_starts_every_other_ranks_clock(tmp_path):
    clock = FakeClock()
    dog = ProgressWatchdog(2.0, [None, None, None], clock)
    dog.member_exited("rank 0", 0)
    clock.now += 1.9
    assert dog.poll([1, 2]) is None
    clock.now += 0.2
    hang = dog.poll([1, 2])
    assert hang is not None and hang.index == 1 and hang.since == "rank 0 exited with code 0"
    assert hang.idle_s == pytest.approx(2.1)


def test_a_failed_exit_starts_no_clock():
    """A failure stops the group through fail-fast; it is not evidence of a hang."""
    clock = FakeClock()
    dog = ProgressWatchdog(2.0, [None, None], clock)
    dog.member_exited("rank 0", 3)
    clock.now += 10
    assert dog.poll([1]) is None


def test_each_beat_restarts_the_clock_and_silence_is_a_hang(tmp_path):
    clock = FakeClock()
    beat = tmp_path / "rank_1"
    dog = ProgressWatchdog(2.0, [None, beat], clock)
    assert dog.poll([0, 1]) is None  # no file yet: no beat
    _beat(beat, 1)
    assert dog.poll([0, 1]) is None  # first beat seen at t=100
    for step in range(5):  # beats keep it alive far past the timeout
        clock.now += 1.5
        _beat(beat, 2 + step)
        assert dog.poll([0, 1]) is None
    clock.now += 1.5
    assert dog.poll([0, 1]) is None
    clock.now += 0.6
    hang = dog.poll([0, 1])
    assert hang is not None and (hang.index, hang.since) == (1, "its last heartbeat")
    # Beating keeps a rank alive after a peer's exit too.
    dog.member_exited("rank 0", 0)
    clock.now += 1.5
    _beat(beat, 100)
    clock.now += 1.5
    assert dog.poll([1]) is None


def test_heartbeat_touches_the_file_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    heartbeat()  # outside ds-launch: nothing to do, no error
    path = tmp_path / "beat"
    monkeypatch.setenv(HEARTBEAT_ENV, str(path))
    heartbeat()
    assert path.exists()
    os.utime(path, ns=(0, 0))
    heartbeat()
    assert path.stat().st_mtime_ns > 0


def _launch(tmp_path: Path, timeout: str, *script: str, ranks: str = "2"):
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    res = run_launcher(
        ["--num_gpus", ranks, "--rank_timeout", timeout, "--term_timeout", "1", HANG, str(out),
         *script],
        tmp_path,
        timeout=60,
    )  # fmt: skip
    return res, time.monotonic() - start, read_pids(out)


def test_a_rank_hanging_after_its_peers_finished_stops_the_job(tmp_path):
    """A real gloo job: after the collective, rank 0 exits 0 and rank 1 hangs in a sleep."""
    res, took, pids = _launch(tmp_path, "1", "gloo")
    assert res.returncode == HANG_EXIT_CODE, res.stdout + res.stderr
    assert "ds-launch: rank 1 on host localhost made no progress for 1." in res.stderr
    assert "since rank 0 exited with code 0 (limit 1 s: --rank_timeout)" in res.stderr
    assert len(pids) == 2 and wait_gone(pids, timeout=2) == []
    assert took < 30


def test_a_rank_that_stops_beating_stops_the_job_while_its_peers_run(tmp_path):
    # 1.5 s rather than less: a beating rank stalled that long by a loaded machine would be
    # judged first.
    res, _, pids = _launch(tmp_path, "1.5", "stop_beating", ranks="3")
    assert res.returncode == HANG_EXIT_CODE, res.stdout + res.stderr
    assert "rank 2 on host localhost made no progress" in res.stderr
    assert "since its last heartbeat" in res.stderr
    assert "stopping it and the other 2 process(es)" in res.stderr
    assert len(pids) == 3 and wait_gone(pids, timeout=2) == []


def test_a_rank_that_keeps_beating_outlives_the_timeout(tmp_path):
    """Rank 1 runs 3.2 s past rank 0's exit with a 1.5 s timeout: its beats are progress."""
    res, took, _ = _launch(tmp_path, "1.5", "slow_but_beating", "3.2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no progress" not in res.stderr
    assert took >= 3.2


def test_a_hang_counts_as_a_failure_for_max_restarts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run_launcher(
        ["--num_gpus", "2", "--rank_timeout", "0.5", "--term_timeout", "1", "--max_restarts",
         "1", HANG, str(out), "stop_beating"],
        tmp_path,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == HANG_EXIT_CODE, res.stderr
    assert "ds-launch: restart 1 of 1" in res.stderr
    assert res.stderr.count("made no progress") == 2
