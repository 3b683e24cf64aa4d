"""Lightning's DeepSpeedStrategy (stages 2 and 3) with this package as `deepspeed`: losses against
plain PyTorch on the same device from the same initial weights and batches. On one GPU (TF32
off: exact fp32 math) as Lightning ships it, and on the CPU with Lightning's two CUDA-only checks
lifted (scripts/lightning_run.py), so the client's whole DeepSpeed path runs without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _metadata_for_src_checkout(tmp: Path, env: dict[str, str]) -> None:
    """Lightning finds DeepSpeed by its distribution metadata; run from src/ (no install, as on
    the GPU machines) this package has none, so give the subprocess a dist-info of ours first
    on its path (a real DeepSpeed installed there is then shadowed on purpose)."""
    import importlib.metadata

    import deepspeed

    try:
        installed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == deepspeed.__version__:
        return
    info = tmp / "meta" / f"deepspeed-{deepspeed.__version__}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {deepspeed.__version__}\n"
    )
    src = str(Path(deepspeed.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(info.parent), src, env.get("PYTHONPATH", "")])
    env["DS_DEEPSPEED_ALLOW_SHADOW"] = "1"


def _run(tmp_path: Path, stage: int, *extra: str) -> dict:
    pytest.importorskip("lightning")
    out = tmp_path / "lightning.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["NVIDIA_TF32_OVERRIDE"] = "0"
    _metadata_for_src_checkout(tmp_path, env)
    cmd = [sys.executable, str(SCRIPTS / "lightning_run.py"), str(stage), str(out), *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    r = json.loads(out.read_text())
    import deepspeed

    assert r["deepspeed"] == deepspeed.__version__  # ours, not a DeepSpeed on the path
    assert len(r["losses"]) == 4
    return r


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_strategy(tmp_path: Path, stage: int) -> None:
    r = _run(tmp_path, stage)
    assert r["losses"] == pytest.approx(r["plain"], abs=1e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_strategy_on_cpu(tmp_path: Path, stage: int) -> None:
    r = _run(tmp_path, stage, "cpu")
    # same batches, same weights: the first step's loss (before any update) is bit-equal; the
    # later ones differ only by the optimizer's rounding (~1e-6)
    assert r["losses"][0] == r["plain"][0]
    assert r["losses"] == pytest.approx(r["plain"], abs=1e-4)
