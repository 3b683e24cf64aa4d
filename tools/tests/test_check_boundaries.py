"""The boundary checker finds undeclared imports, edges outside the design, and cycles."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import check_boundaries as cb  # noqa: E402


def _pkg(root: Path, name: str, deps: list[str], code: str, test_deps: list[str] = ()) -> None:
    mod = name.replace("-", "_")
    src = root / "packages" / name / "src" / mod
    src.mkdir(parents=True)
    (src / "__init__.py").write_text(code)
    dep_list = ", ".join(f'"{d}"' for d in deps)
    test_list = ", ".join(f'"{d}"' for d in test_deps)
    (root / "packages" / name / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\ndependencies = [{dep_list}]\n'
        f"[project.optional-dependencies]\ntest = [{test_list}]\n"
    )


def test_clean_tree(tmp_path):
    _pkg(tmp_path, "ds-accel", ["torch>=2.6"], "import torch\n")
    _pkg(tmp_path, "ds-comm", ["ds-accel>=0.1,<0.2"], "from ds_accel import get_accelerator\n")
    assert cb.check(tmp_path) == []


def test_undeclared_import(tmp_path):
    _pkg(tmp_path, "ds-accel", [], "")
    _pkg(tmp_path, "ds-comm", [], "import ds_accel\n")
    errors = cb.check(tmp_path)
    assert len(errors) == 1 and "does not declare ds-accel" in errors[0]
    assert "__init__.py:1" in errors[0]


def test_edge_outside_design(tmp_path):
    _pkg(tmp_path, "ds-accel", [], "")
    _pkg(tmp_path, "ds-comm", ["ds-accel"], "")
    _pkg(tmp_path, "ds-zero", ["ds-comm"], "")
    _pkg(tmp_path, "ds-offload", ["ds-zero"], "import ds_zero\n")
    errors = cb.check(tmp_path)
    assert any("ds-offload declares ds-zero" in e for e in errors)
    assert any("ds-offload -> ds-zero is not an edge" in e for e in errors)


def test_cycle(tmp_path):
    _pkg(tmp_path, "ds-accel", ["ds-comm"], "")
    _pkg(tmp_path, "ds-comm", ["ds-accel"], "")
    errors = cb.check(tmp_path)
    assert any("cycle" in e and "ds-accel -> ds-comm -> ds-accel" in e for e in errors)


def test_tests_may_use_test_extra(tmp_path):
    _pkg(tmp_path, "ds-accel", [], "")
    _pkg(tmp_path, "ds-comm", ["ds-accel"], "")
    _pkg(tmp_path, "ds-ckpt", ["ds-accel"], "", test_deps=["ds-comm"])
    tests = tmp_path / "packages" / "ds-ckpt" / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text("from ds_comm.testing import distributed_test\n")
    assert cb.check(tmp_path) == []
    (tmp_path / "packages" / "ds-ckpt" / "src" / "ds_ckpt" / "x.py").write_text("import ds_comm\n")
    assert any("does not declare ds-comm in its dependencies" in e for e in cb.check(tmp_path))
