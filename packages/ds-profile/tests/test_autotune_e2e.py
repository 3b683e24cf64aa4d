"""The autotuner end to end on CPU: real ds-launch trials of a 2-rank gloo job.

One search (model-info profile run, then trials), then a second session on the same results:
it launches nothing and gives the same answer. Configurations the memory estimator rules out
are never launched (the launch log is written before each process starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_profile.autotune import Candidate, ModelFacts, fits

SCRIPT = Path(__file__).parent / "autotune_scripts" / "train_tiny.py"
# Tiny's parameters: embedding, MLP (32 -> 64 -> 32), head (32 -> 64)
PARAMS = 8192 * 32 + 32 * 64 + 64 + 64 * 32 + 32 + 32 * 64


def _config(tmp: Path, budget_gb: float, tuner: str = "model_based") -> Path:
    cfg = {
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "autotuning": {
            "enabled": True, "fast": tuner == "model_based", "tuner_type": tuner,
            "overwrite": False, "results_dir": str(tmp / "results"), "exps_dir": str(tmp / "exps"),
            "start_profile_step": 1, "end_profile_step": 3, "tuner_early_stopping": 5,
            "zero_stages": [0, 1], "offload": ["none"], "micro_batch_sizes": [1, 2, 4],
            "memory_per_device_gb": budget_gb, "trial_timeout_s": 120,
        },
    }  # fmt: skip
    path = tmp / f"ds_config_{tuner}.json"
    path.write_text(json.dumps(cfg))
    return path


def _tune(cfg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ds_launcher", "--autotuning", "tune", "--num_gpus", "2", str(SCRIPT),
            "--deepspeed_config", str(cfg)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.timeout(400)
def test_search_rejects_resumes(tmp_path):
    # stage 0 keeps 16 bytes of weights+gradients+Adam per parameter on each rank, stage 1 on
    # two ranks 12: a budget between the two rules out every stage-0 configuration
    budget = 1.15 * 14 * PARAMS / 2**30
    cfg = _config(tmp_path, budget)
    first = _tune(cfg, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    launches = [json.loads(x) for x in (results / "launch_log.jsonl").read_text().splitlines()]
    info = json.loads((results / "model_info.json").read_text())
    assert info["num_params"] == PARAMS
    facts = ModelFacts(PARAMS, info["activation_mem_per_gpu"], None, False, 0)
    budget_bytes = int(budget * 2**30)

    # every launched trial fit the budget; every ruled-out one is absent from the launch log
    launched = {x["name"] for x in launches}
    assert launched and all(
        x["estimate_bytes"] <= x["budget_bytes"] == budget_bytes for x in launches
    )
    rejected = {t["name"] for t in summary["trials"] if t["status"] == "rejected"}
    assert {f"z0_mbs{m}_gas{4 // m}" for m in (1, 2, 4)} <= rejected
    assert not rejected & launched
    for t in summary["trials"]:
        cand = Candidate.from_dict(t)
        assert fits(cand, facts, 2, budget_bytes) == (t["status"] != "rejected")

    # the model-based tuner ran one real trial: stage 1 at the largest micro-batch; the smaller
    # micro-batches of stage 1 only buy memory (the global batch is kept) and wait as fallbacks
    assert launched == {"z1_mbs4_gas1"}
    status = {t["name"]: t["status"] for t in summary["trials"]}
    assert status["z1_mbs4_gas1"] == "best" and summary["best"]["micro_batch"] == 4
    assert status["z1_mbs2_gas2"] == status["z1_mbs1_gas4"] == "skipped"
    optimal = json.loads((results / "ds_config_optimal.json").read_text())
    assert optimal["train_batch_size"] == 8  # the global batch is kept
    assert (
        optimal["train_micro_batch_size_per_gpu"] * optimal["gradient_accumulation_steps"] * 2 == 8
    )
    assert optimal["zero_optimization"]["stage"] == 1 and "autotuning" not in optimal
    assert (results / "trials.png").read_bytes().startswith(b"\x89PNG")
    assert "ruled out by the memory estimator" in first.stdout

    # a second session resumes: nothing launched (not even the profile run), same answer
    second = _tune(cfg, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (results / "launch_log.jsonl").read_text().count("\n") == len(launches)
    again = json.loads((results / "summary.json").read_text())
    assert again["launched"] == 0 and again["best"] == summary["best"]

    # the exhaustive grid over the same space (a folder of its own) runs every admitted
    # configuration as a real trial and picks the best measured one
    grid_dir = tmp_path / "grid"
    grid_dir.mkdir()
    grid = _tune(_config(grid_dir, budget, "gridsearch"), grid_dir)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    gsum = json.loads((grid_dir / "results" / "summary.json").read_text())
    ok = [t for t in gsum["trials"] if t["status"] in ("ok", "best")]
    assert {t["name"] for t in ok} == {f"z1_mbs{m}_gas{4 // m}" for m in (1, 2, 4)}
    best = max(ok, key=lambda t: t["value"])
    assert best["status"] == "best" and gsum["best"]["micro_batch"] == best["micro_batch"]
