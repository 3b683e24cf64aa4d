"""The `deepspeed` distribution: metadata clients gate on, module aliases (the same objects as
ds_all's), the guard against a second DeepSpeed, the console script, the README example."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent


def test_metadata_passes_the_clients_version_gates() -> None:
    import deepspeed
    from packaging import version

    dist_version = importlib.metadata.version("deepspeed")
    assert dist_version == deepspeed.__version__
    parsed = version.parse(dist_version)
    assert parsed.local  # our own release is visible and never mistaken for DeepSpeed's
    # Transformers/Accelerate require >= 0.9.3 and switch at 0.14.x/0.16.4/0.18.2; Lightning >= 0.16
    for gate in ("0.9.3", "0.14.0", "0.14.4", "0.16.0", "0.16.4", "0.18.2", "0.19.8"):
        assert parsed >= version.parse(gate)
    assert (deepspeed.__version_major__, deepspeed.__version_minor__) == (0, 19)


def test_submodules_are_ds_all_modules() -> None:
    import deepspeed
    import deepspeed.runtime.engine
    import deepspeed.runtime.zero.partition_parameters as pp

    import ds_all
    import ds_all.runtime.zero.partition_parameters

    assert pp is ds_all.runtime.zero.partition_parameters
    assert sys.modules["deepspeed.runtime.engine"] is sys.modules["ds_all.runtime.engine"]
    assert deepspeed.runtime.engine.DeepSpeedEngine is ds_all.DeepSpeedEngine
    assert deepspeed.initialize is ds_all.initialize
    # imported eagerly, as DeepSpeed's __init__ does
    for name in ("comm", "zero", "runtime", "utils", "ops", "checkpointing"):
        assert getattr(deepspeed, name) is getattr(ds_all, name)
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
    from deepspeed.launcher.runner import DEEPSPEED_ENVIRONMENT_NAME
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
    from deepspeed.utils import groups, logger, set_z3_leaf_modules
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    assert "WarmupLR" in VALID_LR_SCHEDULES and DEEPSPEED_ENVIRONMENT_NAME
    assert callable(clone_tensors_for_torch_save) and callable(set_z3_leaf_modules)
    assert groups.get_data_parallel_world_size() >= 1 and logger.name == "ds_all"
    assert DeepSpeedCPUAdam.__module__.startswith("ds_kernels") and FusedAdam
    assert callable(get_fp32_state_dict_from_zero_checkpoint)
    with pytest.raises(ModuleNotFoundError, match="deepspeed.no_such_module"):
        import deepspeed.no_such_module  # noqa: F401


def _fake_deepspeed(root: Path) -> Path:
    pkg = root / "deepspeed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("FOREIGN = True\n")
    info = root / "deepspeed-0.19.8.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n")
    return pkg


def test_guard_names_a_foreign_deepspeed(tmp_path: Path) -> None:
    from deepspeed import _guard

    _fake_deepspeed(tmp_path)
    ours = Path(sys.modules["deepspeed"].__file__).parent
    found = _guard.foreign_installations(ours, path=[str(tmp_path), str(ours.parent)])
    assert any("package" in f and str(tmp_path) in f for f in found)
    assert any("distribution deepspeed 0.19.8" in f for f in found)
    assert _guard.foreign_installations(ours, path=[str(ours.parent)]) == []


def test_guard_accepts_another_release_of_this_package(tmp_path: Path) -> None:
    # an editable install keeps the metadata of the release it was installed at
    from deepspeed import _guard

    info = tmp_path / "deepspeed-0.19.8+dsall.0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8+dsall.0.0.1\n"
    )
    ours = Path(sys.modules["deepspeed"].__file__).parent
    assert _guard.foreign_installations(ours, path=[str(tmp_path), str(ours.parent)]) == []
    # a local label that only resembles ours is still another DeepSpeed
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8+dsallx.1\n"
    )
    found = _guard.foreign_installations(ours, path=[str(tmp_path), str(ours.parent)])
    assert found == [f"distribution deepspeed 0.19.8+dsallx.1 ({info})"]


def _import_with(extra_path: Path, allow: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    ours = Path(sys.modules["deepspeed"].__file__).parent.parent
    # ours first on the path, the foreign one behind it: it would be shadowed silently
    env["PYTHONPATH"] = os.pathsep.join([str(ours), str(extra_path), env.get("PYTHONPATH", "")])
    env.pop("DS_DEEPSPEED_ALLOW_SHADOW", None)
    if allow:
        env["DS_DEEPSPEED_ALLOW_SHADOW"] = "1"
    code = "import warnings; warnings.simplefilter('always'); import deepspeed; print('IMPORTED')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_import_refuses_to_shadow_a_real_deepspeed(tmp_path: Path) -> None:
    _fake_deepspeed(tmp_path)
    refused = _import_with(tmp_path, allow=False)
    assert refused.returncode != 0 and "IMPORTED" not in refused.stdout
    assert "would shadow or be shadowed by another DeepSpeed" in refused.stderr
    assert "pip uninstall deepspeed" in refused.stderr and str(tmp_path) in refused.stderr
    allowed = _import_with(tmp_path, allow=True)
    assert allowed.returncode == 0 and "IMPORTED" in allowed.stdout, allowed.stderr[-2000:]
    assert "RuntimeWarning" in allowed.stderr


def test_console_script_is_ds_launch() -> None:
    (ep,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "deepspeed"
    ]
    assert ep.value == "ds_launcher.cli:main"
    import ds_launcher.cli

    assert ep.load() is ds_launcher.cli.main


def test_readme_example_runs(tmp_path: Path) -> None:
    readme = (PACKAGE / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "zero_to_fp32 matches" in out.stdout
