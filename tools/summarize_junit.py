"""Add up the junit reports of every package's test run into closing lines: one per package
(counts and test time), the slowest tests, then ``tests: N passed, N failed, N skipped``.

    python tools/summarize_junit.py .nox/_reports [--expect ds-accel,ds-comm,...] [--slowest 15]

With ``--expect``, a package without a report (its session failed before pytest ran) is named
and counts as a failure. Exit 1 when anything failed.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--expect", default="", help="comma list of packages that must have a report")
    ap.add_argument("--slowest", type=int, default=15, help="how many of the slowest tests to list")
    a = ap.parse_args(argv)
    passed = failed = skipped = 0
    total_s = 0.0
    cases: list[tuple[float, str]] = []
    reports = sorted(Path(a.folder).glob("*.xml"))
    for report in reports:
        p = f = s = 0
        t = 0.0
        for suite in ET.parse(report).getroot().iter("testsuite"):
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skip = int(suite.get("skipped", 0))
            p, f, s = p + int(suite.get("tests", 0)) - bad - skip, f + bad, s + skip
            t += float(suite.get("time", 0.0))
            for case in suite.iter("testcase"):
                name = f"{report.stem}: {case.get('classname', '')}::{case.get('name', '')}"
                cases.append((float(case.get("time", 0.0)), name))
        passed, failed, skipped, total_s = passed + p, failed + f, skipped + s, total_s + t
        print(f"  {report.stem}: {p} passed, {f} failed, {s} skipped in {t:.0f} s")
    have = {r.stem for r in reports}
    missing = [n for n in a.expect.split(",") if n and n not in have]
    for name in missing:
        print(f"  {name}: no report (its session failed before its tests ran)")
    if cases and a.slowest:
        print(f"slowest {min(a.slowest, len(cases))} tests:")
        for secs, name in sorted(cases, reverse=True)[: a.slowest]:
            print(f"  {secs:7.1f} s  {name}")
    if not reports:
        print(f"no junit reports under {a.folder}")
        return 1
    print(
        f"tests: {passed} passed, {failed} failed, {skipped} skipped"
        f" ({len(reports)} packages, {total_s / 60:.1f} min of test time)"
        + (f"; {len(missing)} package(s) without a report: {', '.join(missing)}" if missing else "")
    )
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
