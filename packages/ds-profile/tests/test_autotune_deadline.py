"""The session time limit (``autotuning.session_timeout_s``) with real launches of a stand-in
job: the trial running at the limit is stopped and recorded as not finished, nothing starts
after it, the report of what finished is written, and a resumed session runs only what is
missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_profile.autotune import AutotuneConfigError, AutotuneSettings, Job, search, tune
from ds_profile.autotune._space import Candidate

SCRIPT = Path(__file__).parent / "autotune_scripts" / "timed_job.py"


def test_session_timeout_setting():
    assert AutotuneSettings.from_config({}).session_timeout_s is None
    assert AutotuneSettings.from_config({"session_timeout_s": 90}).session_timeout_s == 90.0
    for bad in (0, -1, "60", True):
        with pytest.raises(AutotuneConfigError, match="session_timeout_s"):
            AutotuneSettings.from_config({"session_timeout_s": bad})


def test_search_stops_when_asked():
    s = AutotuneSettings.from_config({"tuner_early_stopping": 100})
    cands = [Candidate(0, "none", m, 1, False) for m in range(1, 6)]
    ran: list[int] = []

    def run(c: Candidate) -> float:
        ran.append(c.micro_batch)
        return float(c.micro_batch)

    out = search(cands, s, run, stop=lambda: len(ran) >= 2)
    assert ran == [1, 2] and [o.candidate.micro_batch for o in out] == [1, 2]


@pytest.mark.timeout(120)
def test_deadline_stops_running_trial_then_resume(tmp_path, monkeypatch):
    results = tmp_path / "results"
    auto = {
        "enabled": True, "overwrite": False, "tuner_type": "gridsearch", "fast": False,
        "tuner_early_stopping": 100, "results_dir": str(results), "exps_dir": str(tmp_path / "exps"),
        "zero_stages": [0], "offload": ["none"], "micro_batch_sizes": [1, 2, 4],
        "trial_timeout_s": 300, "session_timeout_s": 8,
    }  # fmt: skip
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({"train_batch_size": 4, "autotuning": auto}))
    job = Job(("--num_gpus=1",), str(SCRIPT), ("--deepspeed_config", str(cfg)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIMED_JOB_SLOW_MBS", "2")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    first = tune(job, 1)
    # grid order mbs 1, 2, 4: 1 finishes, 2 is stopped at the limit (not after its own 300 s),
    # 4 never starts
    assert first.timed_out and 7 < first.seconds < 60
    status = {t["micro_batch"]: t["status"] for t in first.trials}
    assert status == {1: "best", 2: "timeout", 4: "skipped"}
    summary = json.loads((results / "summary.json").read_text())
    assert summary["timed_out"] and summary["best"]["micro_batch"] == 1
    assert json.loads((results / "trials" / "z0_mbs2_gas2.json").read_text())["status"] == "timeout"
    launched = [
        json.loads(x)["name"] for x in (results / "launch_log.jsonl").read_text().splitlines()
    ]
    assert launched == ["z0_mbs1_gas4", "z0_mbs2_gas2"]
    assert (results / "trials.png").read_bytes().startswith(b"\x89PNG")

    # resumed without the limit and without the slow trial: only the unfinished ones launch
    monkeypatch.delenv("TIMED_JOB_SLOW_MBS")
    auto["session_timeout_s"] = None
    cfg.write_text(json.dumps({"train_batch_size": 4, "autotuning": auto}))
    second = tune(job, 1)
    assert not second.timed_out and second.launched == 2
    assert second.best is not None and second.best.micro_batch == 4 and second.best_value == 40.0
    launched = [
        json.loads(x)["name"] for x in (results / "launch_log.jsonl").read_text().splitlines()
    ]
    assert launched[2:] == ["z0_mbs2_gas2", "z0_mbs4_gas1"]
