"""ds-report's offload section: the aio engine and why, O_DIRECT, the memlock limit."""

from importlib import metadata

from ds_offload._report import offload_report


def test_offload_section_names_the_engine_and_its_reason():
    r = offload_report()
    assert r["aio engine"] in ("native", "python") and r["aio engine reason"]
    want = {"native": ("kernel-aio", "threads"), "python": ("python",)}[r["aio engine"]]
    assert r["aio backend (O_DIRECT)"] in want
    assert any(k.startswith("O_DIRECT in ") for k in r)
    assert r["memlock limit"] == "unlimited" or r["memlock limit"].endswith(" bytes")


def test_forced_fallback_is_reported(monkeypatch):
    from ds_offload import _aio_build

    monkeypatch.setenv("DS_KERNELS_FORCE_FALLBACK", "aio")
    _aio_build.forget()
    try:
        r = offload_report()
        assert r["aio engine"] == "python" and "DS_KERNELS_FORCE_FALLBACK" in r["aio engine reason"]
        assert r["aio backend (O_DIRECT)"] == "python"
    finally:
        monkeypatch.delenv("DS_KERNELS_FORCE_FALLBACK")
        _aio_build.forget()
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="ds_report.sections")}
    assert eps.get("offload") == "ds_offload._report:offload_report"
