"""Scripts written against DeepSpeed's documented API run unchanged with ds_all standing in for
the `deepspeed` module; where DeepSpeed itself is installed, both give the same losses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "ds_scripts"

# `import deepspeed` resolves to ds_all: the script's text is unchanged.
SHIM = "import runpy, sys, ds_all; sys.modules['deepspeed'] = ds_all; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def _run(script: str, args: list[str], use_deepspeed: bool) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONHASHSEED="0")
    env.pop("RANK", None)
    out = args[0]
    cmd = [sys.executable, "-c", SHIM, str(HERE / script), *args]
    if use_deepspeed:
        env.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_port()),
        )
        cmd = [sys.executable, str(HERE / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


def _port() -> int:
    from ds_comm.testing import free_port

    return free_port()


HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_cnn_with_scheduler_and_accumulation(tmp_path):
    got = _run("cnn_synthetic.py", [str(tmp_path / "ours.json")], use_deepspeed=False)
    assert got["steps"] == 16  # 256 images / 32 per step x 2 epochs
    assert len(got["losses"]) == 32  # micro-steps
    assert got["losses"][-1] < got["losses"][0]
    if HAVE_DEEPSPEED:
        ref = _run("cnn_synthetic.py", [str(tmp_path / "ds.json")], use_deepspeed=True)
        assert got["losses"] == pytest.approx(ref["losses"], abs=1e-4)


def test_gpt_save_and_load(tmp_path):
    got = _run(
        "gpt_save_load.py", [str(tmp_path / "ours.json"), str(tmp_path / "ck")], use_deepspeed=False
    )
    assert got["client_epoch"] == 1 and got["steps"] == 10
    assert got["second"][0] < got["first"][0]  # resumed from trained weights, not the new init
    if HAVE_DEEPSPEED:
        ref = _run(
            "gpt_save_load.py",
            [str(tmp_path / "ds.json"), str(tmp_path / "ck_ds")],
            use_deepspeed=True,
        )
        assert got["first"] == pytest.approx(ref["first"], abs=1e-4)
        assert got["second"] == pytest.approx(ref["second"], abs=1e-4)
