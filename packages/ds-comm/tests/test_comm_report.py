"""ds-report's comm section: what init_distributed would find, from a real entry point."""

from importlib import metadata

import torch.distributed as dist

from ds_comm._report import comm_report


def test_comm_section_reports_backends_and_launch_environment(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(v, raising=False)
    r = comm_report()
    assert r["backends"]["gloo"] is dist.is_gloo_available()
    assert r["launch environment"]["torchrun / ds-launch"] is False
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert comm_report()["launch environment"]["torchrun / ds-launch"] is True
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="ds_report.sections")}
    assert eps.get("comm") == "ds_comm._report:comm_report"
