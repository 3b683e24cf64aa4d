"""ds-report's packages section lists every ds-* package with its version and import status."""

from ds_all._report import PACKAGES, packages_report


def test_packages_section():
    rep = packages_report()
    # the known packages first, then any other installed ds-* distribution (new packages)
    assert list(rep)[: len(PACKAGES)] == list(PACKAGES)
    assert all(name.startswith("ds-") for name in rep)
    for name in PACKAGES:  # ds-all depends on all of them, so all are installed here
        assert rep[name]["installed"] and rep[name]["imports"], (name, rep[name])
        assert rep[name]["version"].count(".") >= 2
