"""The README's example runs as written and prints what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path):
    (code,) = re.findall(
        r"<!-- readme-example -->\n```python\n(.*?)^```$", README.read_text(), re.S | re.M
    )
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "curriculum: [8, 16, 24, 24, 32, 40, 40, 48, 56, 64, 64]" in out, out
    assert "pld_theta after 100 steps: 0.6858" in out
    longest = [int(m) for m in re.findall(r"batch \d: longest sample (\d+)", out)]
    assert (
        len(longest) == 3 and longest[0] <= 4
    )  # step 1: floor(4 + 28 / 8) = 7, to a multiple of 4
    assert "random-LTD kept tokens: 4 of 16" in out
    assert "sparse attention: output (1, 2, 256, 32)" in out
