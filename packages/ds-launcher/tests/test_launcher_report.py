"""ds-report's launcher section: which runners have their programs on PATH."""

import os
import stat
from importlib import metadata

from ds_launcher._report import launcher_report


def test_runner_is_ready_only_when_its_programs_are_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not any(r["ready"] for r in launcher_report()["runners"].values())
    fake = tmp_path / "srun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    r = launcher_report()["runners"]
    assert r["slurm"]["ready"] and r["slurm"]["programs"]["srun"] == os.fspath(fake)
    assert not r["pdsh"]["ready"]
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="ds_report.sections")}
    assert eps.get("launcher") == "ds_launcher._report:launcher_report"
