"""Tier 1: accelerator detection helpers and the core pool of --bind_cores_to_rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_launcher import LauncherError
from ds_launcher._devices import core_pool, format_core_list, physical_cores, split_cores


def _sysfs(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu tree: {cpu: (socket, core id)}."""
    for cpu, (package, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthreads_of_one_core_never_go_to_two_ranks(tmp_path):
    # 2 sockets x 4 cores x 2 threads, Intel numbering: 0-3 socket 0, 4-7 socket 1, then the
    # second threads 8-15 in the same order.
    topo = {cpu: (cpu % 8 // 4, cpu % 4) for cpu in range(16)}
    sysfs = _sysfs(tmp_path, topo)
    pool = physical_cores(list(range(16)), sysfs)
    assert pool == [0, 1, 2, 3, 4, 5, 6, 7]
    # Two ranks: one socket each (DeepSpeed's split of the physical cores), OMP = 4 threads.
    assert split_cores(pool, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_round_robin_socket_numbering_still_gives_one_socket_per_rank(tmp_path):
    # Even CPUs on socket 0, odd on socket 1; threads of a core 8 apart.
    topo = {cpu: (cpu % 2, cpu % 8 // 2) for cpu in range(16)}
    pool = physical_cores(list(range(16)), _sysfs(tmp_path, topo))
    assert split_cores(pool, 2) == [(0, 2, 4, 6), (1, 3, 5, 7)]


def test_restricted_affinity_and_missing_topology(tmp_path):
    topo = {cpu: (0, cpu % 4) for cpu in range(8)}
    sysfs = _sysfs(tmp_path / "sys", topo)
    # Only the second threads are allowed: each is still a core of its own.
    assert physical_cores([4, 5, 6, 7], sysfs) == [4, 5, 6, 7]
    assert physical_cores([1, 5, 2], sysfs) == [1, 2]
    # No topology (some containers): every allowed CPU counts.
    assert physical_cores([3, 1, 2], tmp_path / "nothing") == [1, 2, 3]


def test_bind_core_list_is_used_as_given_but_only_with_allowed_cores(tmp_path):
    assert core_pool("6,1-3", [0, 1, 2, 3, 6], tmp_path) == [6, 1, 2, 3]
    with pytest.raises(LauncherError, match=r"core\(s\) 4,9 that this process cannot run on"):
        core_pool("1-4,9", [0, 1, 2, 3, 6, 7], tmp_path)
    with pytest.raises(LauncherError, match="allowed on .*: 0-3,6-7"):
        core_pool("9", [0, 1, 2, 3, 6, 7], tmp_path)


def test_format_core_list():
    assert format_core_list([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert format_core_list([]) == ""
