"""The README's example runs as written (torchrun, 2 ranks, gloo) and its ranks agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_comm.testing import ReadmeExampleError, extract_readme_example, run_readme_example

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_ranks_agree():
    run = run_readme_example(README)
    assert run.example.nproc == 2
    lines = run.assert_ranks_agree()
    assert [line.split(" ")[0] for line in lines] == ["last", "weights"], lines


def test_readme_example_without_init_distributed_is_refused_on_every_rank(tmp_path):
    """The same script with the init_distributed() line dropped: torchrun still starts 2 ranks,
    and building the ZeRO object fails with the fix named (it used to train each rank alone)."""
    source = extract_readme_example(README).source
    line = "env = ds_comm.init_distributed()"
    assert line in source
    source = source.replace(line, "import os\nrank = int(os.environ['RANK'])")
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- readme-example nproc=2 -->\n```python\n{source}```\n")
    with pytest.raises(ReadmeExampleError) as e:
        run_readme_example(readme)
    for rank in (0, 1):
        assert (
            f"NotInitializedError: ds_zero.wrap: this process is rank {rank} of 2 (WORLD_SIZE=2"
            in str(e.value)
        )
    assert "call ds_comm.init_distributed()" in str(e.value)
