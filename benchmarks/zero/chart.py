"""Render the PNG chart of a run.py result file (for machines where run.py had no matplotlib):

python benchmarks/zero/chart.py benchmarks/results/zero3-2xh200-20261122.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import chart  # noqa: E402

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path = Path(arg)
        chart(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
