"""The real clients on CPU, each in its own process (they import slowly and keep global state):
Hugging Face Trainer and Accelerate driving ds-all through `import deepspeed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPTS = Path(__file__).resolve().parent / "scripts"
# the local label of every ds-deepspeed version; DeepSpeed's own versions have none
OURS_LABEL = "+dsall."
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED")  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", **extra)  # fmt: skip
    return env


def _run(argv: list[str], env: dict[str, str], timeout: int = 300) -> None:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv}\n{out.stdout[-2000:]}\n{out.stderr[-5000:]}"


def _torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(SCRIPTS / script), *args]  # fmt: skip


# DeepSpeed's lone process needs the launcher variables (its world of one goes through mpi4py)
ALONE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _trainer(tmp: Path, stage: int, ranks: int, python: str = sys.executable, **env: str) -> dict:
    out = tmp / f"trainer_s{stage}_w{ranks}_{Path(python).parent.parent.name}"
    argv = (
        [python, str(SCRIPTS / "trainer_run.py"), str(stage), str(out)]
        if ranks == 1
        else _torchrun("trainer_run.py", str(stage), str(out))
    )
    _run(argv, _env(**env), 1800)
    return json.loads((out / "result.json").read_text())


def _check_trainer(r: dict, ranks: int) -> None:
    assert r["world"] == ranks and OURS_LABEL in r["deepspeed"]
    full = {int(k): v for k, v in r["full"].items()}
    resumed = {int(k): v for k, v in r["resumed"].items()}
    assert sorted(full) == [1, 2, 3, 4]
    for step in (3, 4):  # trained again after resuming from checkpoint-2
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)
    assert r["zero_to_fp32_missing"] == [] and r["zero_to_fp32_max_diff"] == 0.0
    assert "model.safetensors" in r["saved"]
    assert r["lr_last"] == pytest.approx(1e-2)


def test_trainer_zero2_and_zero3_plain_python(tmp_path: Path) -> None:
    s2 = _trainer(tmp_path, 2, 1)
    s3 = _trainer(tmp_path, 3, 1)
    _check_trainer(s2, 1)
    _check_trainer(s3, 1)
    # stage 3 builds the model inside zero.Init and Transformers initialises its weights
    # module by module under GatheredParameters (another RNG order than stage 2's plain init),
    # so the two runs start from different weights: both start near ln(vocab) and train
    for r in (s2, s3):
        assert abs(r["full"]["1"] - 4.159) < 0.5
    reference_python = os.environ.get("DS_REFERENCE_PYTHON")
    if reference_python:  # the same script with DeepSpeed 0.19.8: the same losses
        for ours, stage in ((s2, 2), (s3, 3)):
            theirs = _trainer(tmp_path, stage, 1, reference_python, MASTER_PORT="29548", **ALONE)
            assert OURS_LABEL not in theirs["deepspeed"]
            for step, loss in theirs["full"].items():
                assert ours["full"][step] == pytest.approx(loss, abs=1e-5), (stage, step)


def test_trainer_zero3_two_ranks(tmp_path: Path) -> None:
    _check_trainer(_trainer(tmp_path, 3, 2), 2)


def _accelerate(tmp: Path, stage: int, python: str = sys.executable, **env: str) -> dict:
    out = tmp / f"accelerate_s{stage}_{Path(python).parent.parent.name}.json"
    _run([python, str(SCRIPTS / "accelerate_run.py"), str(stage), str(out)], _env(**env), 1800)
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_matches_pytorch_and_deepspeed(tmp_path: Path, stage: int) -> None:
    ours = _accelerate(tmp_path, stage, CLIENT_REFERENCE="1")
    n = len(ours["reference"]["losses"])
    assert ours["losses"] == pytest.approx(ours["reference"]["losses"], abs=1e-5)
    assert ours["lrs"][:n] == pytest.approx(ours["reference"]["lrs"], rel=1e-12)
    assert ours["global_steps"] == [1 + i // 2 if i % 2 else i // 2 for i in range(n)]
    assert ours["after_load"] == ours["after_save"]  # load_state restored weights, optimizer, lr
    assert ours["unwrapped_type"] == "GPT2LMHeadModel"
    assert "transformer.wte.weight" in ours["state_keys"]
    reference_python = os.environ.get("DS_REFERENCE_PYTHON")
    if not reference_python:
        return
    # DeepSpeed 0.19.8 in its own environment, the same script
    theirs = _accelerate(tmp_path, stage, reference_python, MASTER_PORT="29547", **ALONE)
    assert OURS_LABEL not in theirs["deepspeed"]
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-5)
    assert ours["lrs"] == pytest.approx(theirs["lrs"], rel=1e-12)
    assert ours["global_steps"] == theirs["global_steps"]
    assert ours["after_load"] == pytest.approx(theirs["after_load"], abs=1e-5)
    assert ours["state_keys"] == theirs["state_keys"]
