"""The README's example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    text = README.read_text()
    return re.findall(r"<!-- readme-example -->\n```python\n(.*?)^```$", text, re.S | re.M)


def test_readme_example_runs(tmp_path):
    (code,) = _examples()
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "forward:" in done.stdout and "DeepSpeed Flops Profiler" in done.stdout
