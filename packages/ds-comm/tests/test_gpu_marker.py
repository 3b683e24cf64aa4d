"""``@pytest.mark.gpu(n=N)``: a test is skipped only below the GPUs it needs (a one-GPU test runs
on a one-GPU machine)."""

from __future__ import annotations

import pytest

from ds_comm.testing import gpus_needed, skip_missing_gpus


class _Item:
    """The two methods of a collected pytest item that the marker logic uses."""

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self.nodeid = "t.py::test"
        self.marks = [m.mark for m in marks]

    def get_closest_marker(self, name):
        return next((m for m in self.marks if m.name == name), None)

    def add_marker(self, mark):
        self.marks.append(mark.mark)

    def skip_reason(self):
        skip = self.get_closest_marker("skip")
        return None if skip is None else skip.kwargs["reason"]


def test_gpus_needed():
    assert gpus_needed(_Item()) is None
    assert gpus_needed(_Item(pytest.mark.gpu)) == 1
    assert gpus_needed(_Item(pytest.mark.gpu(n=2))) == 2
    assert gpus_needed(_Item(pytest.mark.gpu(4))) == 4
    for bad in (0, "2", True):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            gpus_needed(_Item(pytest.mark.gpu(n=bad)))


@pytest.mark.parametrize(
    ("device_count", "skipped"),
    [(0, {"one", "two"}), (1, {"two"}), (2, set()), (8, set())],
)
def test_skips_only_tests_needing_more_gpus_than_present(device_count, skipped):
    items = {
        "cpu": _Item(),
        "one": _Item(pytest.mark.gpu),
        "two": _Item(pytest.mark.gpu(n=2)),
    }
    skip_missing_gpus(items.values(), device_count=device_count)
    assert {k for k, it in items.items() if it.skip_reason()} == skipped
    if "two" in skipped:
        assert items["two"].skip_reason() == (
            f"needs 2 CUDA GPU(s), this machine has "
            f"{'no CUDA GPU' if device_count == 0 else f'{device_count} CUDA GPU(s)'}"
        )
