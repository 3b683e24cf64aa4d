"""The README's example runs as written (one process, CPU): an async-IO round trip and an
NVMe-offloaded model that trains like torch's AdamW."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    run = run_readme_example(README, timeout=600)
    assert run.example.nproc == 1
    assert "NVMe-offloaded AdamW vs torch: max |diff|" in run.stdout
