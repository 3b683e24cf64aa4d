"""tools/_packages.py: packages are discovered (a new folder needs no edit anywhere), siblings are
found by distribution name (ds-deepspeed installs as `deepspeed`), closures follow dependencies
and the test extra, third-party requirements are told apart from the tree's."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _packages as pk  # noqa: E402


def _pkg(root: Path, folder: str, deps: list[str], test: list[str] = (), dist: str = "",
         module: str = "") -> None:  # fmt: skip
    module = module or folder.replace("-", "_")
    (root / folder / "src" / module).mkdir(parents=True)
    (root / folder / "src" / module / "__init__.py").write_text("")
    q = ", ".join(f'"{d}"' for d in deps)
    t = ", ".join(f'"{d}"' for d in test)
    (root / folder / "pyproject.toml").write_text(
        f'[project]\nname = "{dist or folder}"\ndependencies = [{q}]\n'
        f'[project.optional-dependencies]\ntest = [{t}]\nmpi = ["mpi4py>=3.1"]\n'
    )


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, pk.Package]:
    _pkg(tmp_path, "ds-accel", ["torch>=2.6"])
    _pkg(tmp_path, "ds-comm", ["torch>=2.6", "ds-accel>=0.1,<0.2"])
    _pkg(
        tmp_path,
        "ds-zero",
        ["ds-comm>=0.1,<0.2", "pydantic>=2.6"],
        test=["pytest>=8", "ds-kernels>=0.1"],
    )
    _pkg(tmp_path, "ds-kernels", ["ds_accel>=0.1", "ninja"])
    _pkg(tmp_path, "ds-all", ["ds-zero>=0.1"])
    _pkg(tmp_path, "ds-deepspeed", ["ds-all>=0.2,<0.3"], dist="deepspeed", module="deepspeed")
    (tmp_path / "notes").mkdir()  # a folder without pyproject.toml is not a package
    return pk.discover(tmp_path)


def test_discovery_and_names(tree):
    assert list(tree) == ["ds-accel", "ds-all", "ds-comm", "ds-deepspeed", "ds-kernels", "ds-zero"]
    ds = tree["ds-deepspeed"]
    assert ds.dist == "deepspeed" and ds.imports == ["deepspeed"]
    assert ds.wheel_prefix() == "deepspeed-"
    assert tree["ds-zero"].wheel_prefix() == "ds_zero-"
    for name in ("ds-deepspeed", "deepspeed", "packages/ds-deepspeed/"):
        assert pk.find(name, tree) is ds
    assert pk.find("ds_zero", tree) is tree["ds-zero"]
    with pytest.raises(SystemExit, match="no package 'ds-nope'"):
        pk.find("ds-nope", tree)


def test_closure_follows_dependencies_and_test_extra(tree):
    names = lambda ps: sorted(p.folder for p in ps)  # noqa: E731
    assert names(pk.closure(tree["ds-zero"], tree)) == ["ds-accel", "ds-comm", "ds-zero"]
    assert names(pk.closure(tree["ds-zero"], tree, with_test=True)) == [
        "ds-accel", "ds-comm", "ds-kernels", "ds-zero"]  # fmt: skip
    # a dependency's test extra is not followed; the sibling named with '_' is found
    assert names(pk.closure(tree["ds-deepspeed"], tree)) == [
        "ds-accel", "ds-all", "ds-comm", "ds-deepspeed", "ds-zero"]  # fmt: skip


def test_external_requirements(tree):
    group = pk.closure(tree["ds-zero"], tree)
    assert sorted(pk.external_requirements(group, tree)) == ["pydantic>=2.6", "torch>=2.6"]
    assert tree["ds-zero"].extras["mpi"] == ("mpi4py>=3.1",)


def test_req_name():
    assert pk.req_name("ds_comm[mpi]>=0.1") == "ds-comm"
    assert pk.req_name("triton>=3.0; platform_system == 'Linux'") == "triton"
    assert pk.req_name("Torch") == "torch"


def test_stale_wheels_are_rebuilt_fresh_ones_kept(tree, tmp_path, monkeypatch):
    built = []

    def fake_run(cmd, check):
        built.append(Path(cmd[-1]).name if cmd[-1] != "-q" else Path(cmd[-2]).name)
        dist = Path(cmd[cmd.index("-w") + 1])
        (dist / "ds_accel-0.1.0-py3-none-any.whl").write_text("wheel")

    monkeypatch.setattr(pk.subprocess, "run", fake_run)
    monkeypatch.setattr(pk, "ROOT", tmp_path)
    dist = tmp_path / "dist"
    pk.build_wheels([tree["ds-accel"]], dist)
    pk.build_wheels([tree["ds-accel"]], dist)  # newer than every source file: kept
    assert built == ["ds-accel"]
    later = time.time() + 5
    os.utime(tree["ds-accel"].path / "src" / "ds_accel" / "__init__.py", (later, later))
    pk.build_wheels([tree["ds-accel"]], dist)
    assert built == ["ds-accel", "ds-accel"]
