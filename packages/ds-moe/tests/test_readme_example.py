"""The README's example runs as written (torchrun, ep_size 2 on 2 ranks, gloo) and the ranks end
with the same dense (non-expert) weights."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_ranks_agree():
    run = run_readme_example(README)
    assert run.example.nproc == 2
    lines = run.assert_ranks_agree()
    assert lines[0] == "experts held 2 of 4"
    assert lines[1].startswith("dense weights checksum ")
