"""The README's example runs as written (2 CPU ranks of a gloo job) and prints what it shows.

The README marks its example blocks with `<!-- readme-example file=NAME -->` (a file to create),
`<!-- readme-example run -->` (ds-launch command lines) and `<!-- readme-example stdout -->`
(the expected output, in any line order); each marker is followed by a fenced block.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import run_launcher

README = Path(__file__).resolve().parents[1] / "README.md"

_MARKER = re.compile(r"<!-- readme-example (?P<what>[^>]*?) -->\n")
_FENCE = re.compile(r"```[\w-]*\n(?P<body>.*?)^```$", re.S | re.M)


@dataclass
class Example:
    files: dict[str, str] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)


def extract(text: str) -> Example:
    example = Example()
    for marker in _MARKER.finditer(text):
        fence = _FENCE.match(text, marker.end())
        if fence is None:
            raise ValueError(
                f"readme-example marker {marker.group(0)!r} is not followed by a fence"
            )
        what, body = marker.group("what"), fence.group("body")
        if what.startswith("file="):
            example.files[what.removeprefix("file=")] = body
        elif what == "run":
            lines = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
            example.commands += [shlex.split(ln) for ln in lines]
        elif what == "stdout":
            example.stdout += body.splitlines()
        else:
            raise ValueError(f"unknown readme-example marker {what!r}")
    return example


def test_extract_reads_marked_blocks_only():
    text = (
        "```python\nnot_run()\n```\n<!-- readme-example file=a.py -->\n```python\nx = 1\n```\n"
        "<!-- readme-example run -->\n```sh\n# comment\nds-launch a.py 'b c'\n```\n"
        "<!-- readme-example stdout -->\n```text\nout\n```\n"
    )
    ex = extract(text)
    assert ex == Example({"a.py": "x = 1\n"}, [["ds-launch", "a.py", "b c"]], ["out"])
    with pytest.raises(ValueError, match="not followed by a fence"):
        extract("<!-- readme-example run -->\ntext\n```sh\nx\n```\n")


def test_readme_example_runs_and_prints_what_the_readme_shows(tmp_path):
    example = extract(README.read_text())
    assert example.files and example.commands and example.stdout
    for name, body in example.files.items():
        (tmp_path / name).write_text(body)
    stdout: list[str] = []
    for argv in example.commands:
        assert argv[0] == "ds-launch", argv
        # `python -m ds_launcher` is the ds-launch entry point run by this test's interpreter.
        res = run_launcher(argv[1:], tmp_path, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        stdout += res.stdout.splitlines()
    assert sorted(stdout) == sorted(example.stdout)
