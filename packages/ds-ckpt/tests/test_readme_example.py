"""The README's example runs as written: on 2 gloo ranks under torchrun, and as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ds_comm.testing import extract_readme_example, run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"
EXPECTED = ["step 1, restored exactly: True", "whole moment: True"]


def test_readme_example_on_two_ranks():
    run = run_readme_example(README, timeout=180)
    assert run.example.nproc == 2
    assert run.assert_ranks_agree() == EXPECTED


def test_readme_example_in_one_process(tmp_path):
    example = extract_readme_example(README)
    script = tmp_path / "example.py"
    script.write_text(example.source)
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_cpu_env(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"rank 0: {line}" for line in EXPECTED]
    assert (tmp_path / "checkpoints" / "step1" / "manifest.json").is_file()


def _cpu_env() -> dict[str, str]:
    """This environment without a launcher's variables, on the CPU (as run_readme_example)."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env
