"""The README's example runs as written (torchrun, 2 gloo ranks): Ulysses attention, TiledMLP
and the tiled logits loss give one process's loss and lm_head gradient on every rank."""

from __future__ import annotations

from pathlib import Path

from ds_comm.testing import run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_one_process():
    run = run_readme_example(README)
    assert run.example.nproc == 2
    lines = run.assert_ranks_agree()
    assert lines[0].startswith("loss ") and lines[0].endswith("equals one process: True"), lines
    assert lines[1] == "lm_head gradient equals one process: True", lines
