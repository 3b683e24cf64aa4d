"""The README's example runs as written (torchrun, 2 ranks, gloo) and its ranks agree; the
README-example runner itself (marker parsing, failures, timeouts, rank agreement)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_comm.testing import (
    ExampleRun,
    ReadmeExample,
    ReadmeExampleError,
    extract_readme_example,
    run_readme_example,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_ranks_agree():
    run = run_readme_example(README)
    assert run.example.nproc == 2
    assert set(run.rank_stdout) == {0, 1}  # each rank's own output, read from torchrun's files
    lines = run.assert_ranks_agree()
    assert lines[0] == "mean [0.5, 1.5, 2.5, 3.5] gathered [0.0, 0.0, 1.0, 1.0]"
    cosine = float(lines[1].rsplit(" ", 1)[1])
    assert 0.3 < cosine < 1.0  # a 1-bit approximation of the mean: close, not exact
    for op in ("all_reduce", "all_gather_single", "compressed_allreduce.signs"):
        assert f"'{op}'" in lines[2]


def _readme(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "README.md"
    p.write_text(text)
    return p


def test_marked_blocks_are_concatenated_and_unmarked_ones_ignored(tmp_path):
    readme = _readme(
        tmp_path,
        "# pkg\n\n```python\nnot_run()\n```\n\n<!-- readme-example nproc=2 -->\n```python\n"
        "a = 1\n```\n\nprose\n\n<!-- readme-example nproc=2 -->\n```python\nprint(a)\n```\n",
    )
    ex = extract_readme_example(readme)
    assert ex == ReadmeExample(readme, "a = 1\n\nprint(a)\n", 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("# pkg\n```python\nx = 1\n```\n", "no example marked"),
        ("<!-- readme-example -->\ntext\n```python\nx\n```\n", "must precede ```python"),
        ("<!-- readme-example -->\n```python\nx = 1\n", "never closed"),
        ("<!-- readme-example ranks=2 -->\n```python\nx\n```\n", "unknown readme-example arg"),
        (
            "<!-- readme-example -->\n```python\nx\n```\n"
            "<!-- readme-example nproc=2 -->\n```python\ny\n```\n",
            "disagree on nproc",
        ),
    ],
)
def test_bad_markers_are_errors_naming_the_readme(tmp_path, text, match):
    readme = _readme(tmp_path, text)
    with pytest.raises(ReadmeExampleError, match=match) as e:
        extract_readme_example(readme)
    assert str(readme) in str(e.value)


def test_single_process_example_runs_on_cpu_without_launcher_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # an enclosing launcher's variables do not leak in
    readme = _readme(
        tmp_path,
        "<!-- readme-example -->\n```python\nimport os\n"
        "print(os.environ['DS_ACCELERATOR'], os.environ.get('WORLD_SIZE'))\n```\n",
    )
    run = run_readme_example(readme)
    assert run.stdout.strip() == "cpu None"


def test_failing_example_reports_its_output(tmp_path):
    readme = _readme(
        tmp_path,
        "<!-- readme-example -->\n```python\nprint('before')\nraise SystemExit('boom')\n```\n",
    )
    with pytest.raises(ReadmeExampleError, match=r"exited with 1[\s\S]*before[\s\S]*boom"):
        run_readme_example(readme)


def test_timeout_kills_the_example(tmp_path):
    readme = _readme(
        tmp_path, "<!-- readme-example -->\n```python\nimport time\ntime.sleep(60)\n```\n"
    )
    with pytest.raises(ReadmeExampleError, match="did not finish in 2 s"):
        run_readme_example(readme, timeout=2)


def _run(stdout: str, nproc: int = 2) -> ExampleRun:
    return ExampleRun(ReadmeExample(Path("R.md"), "", nproc), stdout, "")


def test_rank_agreement():
    ok = _run("rank 1: loss 0.5\nnoise\nrank 0: loss 0.5\n")
    assert ok.rank_lines() == {0: ["loss 0.5"], 1: ["loss 0.5"]}
    assert ok.assert_ranks_agree() == ["loss 0.5"]
    with pytest.raises(ReadmeExampleError, match="rank 1 printed"):
        _run("rank 0: loss 0.5\nrank 1: loss 0.6\n").assert_ranks_agree()
    with pytest.raises(ReadmeExampleError, match=r"got them from \[0\]"):
        _run("rank 0: loss 0.5\n").assert_ranks_agree()
