"""Add up the junit reports of every package's test run into one closing line:
``tests: N passed, N failed, N skipped``."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(folder: str) -> int:
    passed = failed = skipped = 0
    reports = sorted(Path(folder).glob("*.xml"))
    for report in reports:
        for suite in ET.parse(report).getroot().iter("testsuite"):
            tests = int(suite.get("tests", 0))
            f = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            s = int(suite.get("skipped", 0))
            passed += tests - f - s
            failed += f
            skipped += s
            print(f"  {report.stem}: {tests - f - s} passed, {f} failed, {s} skipped")
    if not reports:
        print(f"no junit reports under {folder}")
        return 1
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
