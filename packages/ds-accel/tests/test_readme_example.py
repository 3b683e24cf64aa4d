"""The README's example runs as written (one process, forced to the CPU by the runner)."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    run = run_readme_example(README)
    assert run.example.nproc == 1
    first, second = run.stdout.splitlines()[:2]
    assert first.startswith("cpu gloo 1 device(s), copy+scale ")
    assert second.startswith("bf16 supported: ")
