"""`ds-accel-report`: print the accelerator report as JSON (ds-report gathers it too)."""

from __future__ import annotations

import json
import sys

from ds_accel._registry import AcceleratorError, report


def main(argv: list[str] | None = None) -> int:
    try:
        print(json.dumps(report(), indent=2, default=str))
    except AcceleratorError as e:
        print(f"ds-accel: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
