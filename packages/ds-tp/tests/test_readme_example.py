"""The README's example runs as written (torchrun, 2 gloo ranks): AutoTP at tp=2 trains like
one process."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_one_process():
    run = run_readme_example(README)
    assert run.example.nproc == 2
    lines = run.assert_ranks_agree()
    assert lines == ["losses equal one process: True", "weights equal one process: True"], lines
