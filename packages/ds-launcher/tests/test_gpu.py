"""Tier 3: ds-launch on a CUDA machine, one rank per GPU, NCCL all-reduce."""

from __future__ import annotations

import json
import os

import pytest
from conftest import SCRIPTS, free_port, launcher_env, run_launcher

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
def test_one_rank_per_gpu_with_nccl(tmp_path):
    n = torch.cuda.device_count()
    out = tmp_path / "out"
    out.mkdir()
    env = launcher_env()
    env.pop("DS_ACCELERATOR")  # detection must find the GPUs by itself
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    res = run_launcher(
        ["--master_port", str(free_port()), str(SCRIPTS / "nccl_check.py"), str(out)],
        tmp_path,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{n} rank(s)" in res.stderr
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]
    assert len(records) == n
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    expected_visible = parent if parent else ",".join(str(i) for i in range(n))
    for rec in records:
        assert rec["sum"] == n * (n - 1) / 2 and rec["world_size"] == n
        assert rec["device"] == rec["local_rank"] and rec["device_count"] == n
        assert rec["visible"].replace(" ", "") == expected_visible.replace(" ", "")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_include_selects_gpus(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = launcher_env()
    env.pop("DS_ACCELERATOR")
    res = run_launcher(
        ["-i", "localhost:1", "--master_port", str(free_port()), str(SCRIPTS / "nccl_check.py"),
         str(out)],
        tmp_path,
        timeout=300,
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    (record,) = [json.loads(p.read_text()) for p in out.glob("rank_*.json")]
    assert record["visible"] == "1" and record["device_count"] == 1 and record["sum"] == 0.0
