"""Tier 1: --include/--exclude/--num_nodes/--num_gpus selection."""

from __future__ import annotations

import pytest

from ds_launcher import HostfileError, select_resources

AVAILABLE = {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}


def test_no_filter_keeps_everything_in_order():
    assert select_resources(AVAILABLE) == AVAILABLE


def test_include_hosts_and_slots_keeps_hostfile_order():
    got = select_resources(AVAILABLE, include="worker-2@worker-0:1,3")
    assert got == {"worker-0": [1, 3], "worker-2": [0, 1]}
    assert list(got) == ["worker-0", "worker-2"]


def test_exclude_slots_and_whole_hosts():
    got = select_resources(AVAILABLE, exclude="worker-0:0,1@worker-2")
    assert got == {"worker-0": [2, 3], "worker-1": [0, 1, 2, 3]}
    # Excluding every slot of a host drops the host.
    assert "worker-2" not in select_resources(AVAILABLE, exclude="worker-2:0,1")


def test_num_nodes_and_num_gpus():
    assert select_resources(AVAILABLE, num_nodes=2, num_gpus=2) == {
        "worker-0": [0, 1],
        "worker-1": [0, 1],
    }


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(include="worker-0", exclude="worker-1"), "cannot be used together"),
        (dict(include="worker-9"), "names host 'worker-9'"),
        (dict(include="worker-2:5"), "slot 5 of host 'worker-2'"),
        (dict(exclude="nobody:0"), "names host 'nobody'"),
        (dict(include="worker-0:x"), "slot 'x' is not a whole number"),
        (dict(include=""), "is empty"),
        (dict(include="worker-0@@worker-1"), "empty entry"),
        (dict(include="-oProxyCommand=x"), "starts with '-'"),
        (dict(include="worker-0", num_gpus=1), "cannot be combined"),
        (dict(num_nodes=4), "more hosts"),
        (dict(num_gpus=3), "worker-2"),
        (dict(num_nodes=0), "at least 1"),
        (dict(exclude="worker-0@worker-1@worker-2"), "leaves no hosts"),
    ],
)
def test_bad_selections_name_the_flag_and_the_fix(kwargs, needle):
    with pytest.raises(HostfileError, match=None) as info:
        select_resources(AVAILABLE, source="hostfile 'hf'", **kwargs)
    assert needle in str(info.value)
