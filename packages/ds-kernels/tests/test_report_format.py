"""``ds-report`` prints every section as labelled lines under a header naming its package: no
Python dict or list dumps, whatever shape a section's dict has."""

from __future__ import annotations

import re

from ds_kernels import _report
from ds_kernels._report import format_section, main


class _Dist:
    def __init__(self, name):
        self.name = name


class _EP:
    """An entry point of the ds_report.sections group, as importlib.metadata gives it."""

    def __init__(self, name, fn, dist):
        self.name, self._fn, self.dist = name, fn, _Dist(dist)

    def load(self):
        return self._fn


NESTED = {
    "flag": True,
    "missing": None,
    "backends": {"gloo": True, "nccl": False},
    "runners": {"ssh": {"ready": True, "programs": {"ssh": "/usr/bin/ssh"}}},
    "isa": ["avx2", "avx512f"],
    "devices": [{"index": 0, "name": "gpu0"}, {"index": 1, "name": "gpu1"}],
    "many": {f"k{i}": i for i in range(6)},
    "empty": {},
}


def test_nested_section_becomes_labelled_lines():
    lines = format_section("demo", "ds-demo", NESTED)
    text = "\n".join(lines)
    assert lines[0] == "[demo] from ds-demo"
    assert not re.search(r"[{}]|\[\s*'", text), text  # no dict or list repr anywhere
    assert re.search(r"^flag \.+ yes$", text, re.M)
    assert re.search(r"^missing \.+ -$", text, re.M)
    assert re.search(r"^backends \.+ gloo: yes, nccl: no$", text, re.M)
    assert re.search(r"^runners$\n^  ssh$\n^    ready \.+ yes$", text, re.M)
    assert re.search(r"^isa \.+ avx2, avx512f$", text, re.M)
    assert re.search(r"^devices$\n^  \[0\] \.+ index: 0, name: gpu0$", text, re.M)
    assert re.search(r"^many$\n^  k0 \.+ 0$", text, re.M)  # more than 4 keys: one per line
    assert re.search(r"^empty \.+ \(none\)$", text, re.M)


def test_ds_report_sections_name_their_package(monkeypatch, capsys):
    def broken():
        raise RuntimeError("section exploded")

    monkeypatch.setattr(
        _report,
        "_section_entry_points",
        lambda: [_EP("demo", lambda: NESTED, "ds-demo"), _EP("bad", broken, "ds-bad")],
    )
    assert main([]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "ds-report"
    headers = [line for line in text.splitlines() if line.startswith("[")]
    assert headers == [
        "[kernels] from ds-kernels: toolchain and ops",
        "[demo] from ds-demo",
        "[bad] from ds-bad",
    ]
    assert "{" not in text and "}" not in text
    assert re.search(r"^error \.+ RuntimeError: section exploded$", text, re.M)


def test_installed_sections_print_without_dict_dumps(capsys):
    # whatever sections the installed packages register (ds-comm's at least, in the test extra)
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "{" not in text and "}" not in text, text
    for line in text.splitlines():
        if line.startswith("["):
            assert re.match(r"^\[[\w-]+\] from ds-[\w-]+", line), line
