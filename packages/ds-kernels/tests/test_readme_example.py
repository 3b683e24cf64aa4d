"""The README's example runs as written (one process, CPU): CPUAdam matches torch's AdamW and
writes the bf16 copies, through the compiled op or its fallback."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(session_cache):
    # the example inherits DS_KERNELS_CACHE=session_cache: the op is built once per session
    run = run_readme_example(README, timeout=600)
    assert run.example.nproc == 1
    lines = run.stdout.splitlines()
    assert lines[0].startswith("cpu_optim compatible=")
    assert lines[1].startswith("CPUAdam backend ") and "max |diff| vs AdamW" in lines[1]
