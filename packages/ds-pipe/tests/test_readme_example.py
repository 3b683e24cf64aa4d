"""The README's example runs as written (torchrun, 2 stages on 2 ranks, gloo), every rank
reports the same losses, and training lowers the loss."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_ranks_agree():
    run = run_readme_example(README)
    assert run.example.nproc == 2
    lines = run.assert_ranks_agree()
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
