"""Tier 1: hostfile parsing (DeepSpeed's format) and its errors."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_launcher import HostfileError, format_hostfile, parse_hostfile, read_hostfile


def test_parses_deepspeed_format_with_comments_and_blank_lines():
    text = "# cluster\n\nworker-0 slots=8\n  worker-1   slots=4  # half node\n\n10.0.0.7 slots=1\n"
    assert parse_hostfile(text) == {"worker-0": 8, "worker-1": 4, "10.0.0.7": 1}
    assert list(parse_hostfile(text)) == ["worker-0", "worker-1", "10.0.0.7"]  # order = ranks


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("worker-0", "missing slots"),
        ("worker-0 slots=", "whole number"),
        ("worker-0 slots=two", "whole number"),
        ("worker-0 slots=0", "whole number from 1"),
        ("worker-0 slots=-1", "whole number"),
        ("worker-0 gpus=2", "expected 'slots=N'"),
        ("worker-0 slots=2 extra", "unexpected text"),
        ("-oProxyCommand=touch_x slots=2", "starts with '-'"),
        ("host$(reboot) slots=2", "'$()'"),
        ("host;rm slots=2", "';'"),
        ("a`b` slots=1", "'`'"),
        ("w@x slots=1", "'@'"),
        ("w:1 slots=1", "':'"),
    ],
)
def test_bad_lines_name_file_line_and_text(tmp_path, line, needle):
    path = tmp_path / "hostfile"
    path.write_text(f"# header\nok-host slots=1\n{line}\n")
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    msg = str(info.value)
    assert needle in msg
    assert f"{path}:3:" in msg
    assert repr(line) in msg


def test_duplicate_host_names_both_lines(tmp_path):
    path = tmp_path / "hf"
    path.write_text("a slots=1\nb slots=2\na slots=4\n")
    with pytest.raises(HostfileError, match=r"hf:3: .*listed twice \(first on line 1\)"):
        read_hostfile(path)


def test_duplicate_hosts_differing_only_in_case_name_both_spellings(tmp_path):
    """LOCALHOST and localhost are one machine: two nodes would share its devices."""
    path = tmp_path / "hf"
    path.write_text("localhost slots=1\n# other\nWorker-1 slots=2\nLOCALHOST slots=1\n")
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    assert str(info.value).startswith(
        f"{path}:4: 'LOCALHOST slots=1': host 'LOCALHOST' is listed twice (first on line 1 as "
        "'localhost', host names are case-insensitive)"
    )
    with pytest.raises(HostfileError, match=r"hf:2: .*'worker-1'.*line 1 as 'Worker-1'"):
        parse_hostfile("Worker-1 slots=1\nworker-1 slots=1\n", "hf")


def test_line_numbers_count_newlines_only():
    """Form feeds, U+2028 and friends end no line: the number is what an editor shows."""
    text = "a slots=1\x0c\r\n# note \u2028 still line 2\r\nb slots=x\n"
    with pytest.raises(HostfileError, match=r"^hf:3: 'b slots=x': slots must be"):
        parse_hostfile(text, "hf")
    assert parse_hostfile("a slots=1\x0b\r\nb slots=2", "hf") == {"a": 1, "b": 2}


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(HostfileError, match="does not exist"):
        read_hostfile(tmp_path / "nope")
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(HostfileError, match="lists no hosts"):
        read_hostfile(tmp_path / "empty")


_host = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)


@given(
    st.lists(_host, min_size=1, max_size=8, unique_by=str.lower).flatmap(
        lambda names: st.fixed_dictionaries({n: st.integers(1, 4096) for n in names})
    )
)
def test_format_parse_round_trip(hosts):
    assert parse_hostfile(format_hostfile(hosts)) == hosts


# Text built from hostfile-ish pieces finds more interesting cases than uniform noise.
_pieces = st.sampled_from(
    ["slots=", "slots=1", "slots=0", "=", "#", " ", "\t", "\n", "\r\n", "-", "$(", "`", "h", "1",
     "worker-1", ":", "@", ",", "\x00", "\u00e9", "\u2028", "99999999999"]
)  # fmt: skip
_text = st.one_of(
    st.text(),
    st.lists(_pieces, max_size=30).map("".join),
    st.text(alphabet=string.printable),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_text)
def test_fuzz_any_input_parses_or_raises_hostfile_error(text):
    try:
        hosts = parse_hostfile(text, "fuzz")
    except HostfileError as exc:
        assert str(exc).startswith("fuzz:")
        return
    # Whatever parsed is well-formed and survives a round trip.
    for host, slots in hosts.items():
        assert host and not host.startswith("-") and slots >= 1
    assert parse_hostfile(format_hostfile(hosts)) == hosts
