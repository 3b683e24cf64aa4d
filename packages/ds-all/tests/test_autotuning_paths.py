"""``ds_all.autotuning``: DeepSpeed's ``Autotuner(args, active_resources)`` and
``DeepSpeedAutotuningConfig``, driven as DeepSpeed's launcher drives them."""

from __future__ import annotations

import json
import shlex
from argparse import Namespace
from pathlib import Path

import pytest

from ds_all.autotuning import Autotuner
from ds_all.autotuning import autotuner as autotuner_module
from ds_all.autotuning.config import DeepSpeedAutotuningConfig, get_model_info_config
from ds_profile.autotune import AutotuneConfigError

SCRIPT = Path(__file__).parent / "ds_scripts" / "autotune_tiny.py"


def _runner_args(script: Path, config: Path, **kw) -> Namespace:
    """What DeepSpeed's runner parses (its defaults), then ``kw``."""
    ns = Namespace(hostfile="/job/hostfile", include="", exclude="", num_nodes=-1, num_gpus=-1,
                   master_port=29500, master_addr="", launcher="pdsh", autotuning="tune",
                   user_script=str(script), user_args=["--deepspeed_config", str(config)])  # fmt: skip
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_config_defaults_are_deepspeeds():
    cfg = DeepSpeedAutotuningConfig({})
    assert cfg.repr() == {
        "enabled": False, "fast": True, "results_dir": "autotuning_results",
        "exps_dir": "autotuning_exps", "overwrite": True, "start_profile_step": 3,
        "end_profile_step": 5, "metric": "throughput", "metric_path": None,
        "tuner_type": "gridsearch", "tuner_early_stopping": 5, "tuner_num_trials": 50,
        "arg_mappings": None, "model_info": None, "model_info_path": None, "mp_size": 1,
        "max_train_batch_size": None, "min_train_batch_size": 1,
        "max_train_micro_batch_size_per_gpu": 1024, "min_train_micro_batch_size_per_gpu": 1,
        "num_tuning_micro_batch_sizes": 3,
    }  # fmt: skip
    set_ = DeepSpeedAutotuningConfig({"autotuning": {"enabled": True, "metric": "latency",
                                                     "model_info": {"profile": True}}})  # fmt: skip
    assert set_.enabled and set_.metric == "latency"
    assert set_.model_info == {"profile": True, "num_params": None, "hidden_size": None,
                               "num_layers": None}  # fmt: skip
    assert get_model_info_config({"model_info": None}) is None
    # a key DeepSpeed would keep unread is refused, naming it
    with pytest.raises(AutotuneConfigError, match="tuner_typ"):
        DeepSpeedAutotuningConfig({"autotuning": {"tuner_typ": "random"}})


def test_trial_resources_and_launcher_options(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    hosts = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    # DeepSpeed's counting: the flags when set, else the active hosts and the first's slots
    assert autotuner_module._exp_resources(_runner_args(SCRIPT, cfg), hosts) == (2, 4)
    assert autotuner_module._exp_resources(_runner_args(SCRIPT, cfg, num_gpus=2), hosts) == (2, 2)
    args = _runner_args(SCRIPT, cfg, num_nodes=1, num_gpus=2, master_port=29600)
    # the default hostfile does not exist here: not passed on; one node: no multi-node launcher
    assert autotuner_module._launcher_args(args, 1) == [
        "--num_nodes", "1", "--num_gpus", "2", "--master_port", "29600"
    ]  # fmt: skip
    assert autotuner_module._launcher_args(args, 2)[-2:] == ["--launcher", "pdsh"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=4\nb slots=4\n")
    args = _runner_args(SCRIPT, cfg, hostfile=str(hostfile), include="a:0,1", launcher="")
    assert autotuner_module._launcher_args(args, 2) == [
        "--hostfile", str(hostfile), "--include", "a:0,1", "--master_port", "29500"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="active_resources is empty"):
        Autotuner(_runner_args(SCRIPT, cfg), {})
    with pytest.raises(ValueError, match="--deepspeed_config"):
        Autotuner(_runner_args(SCRIPT, cfg, user_args=["--lr", "1"]), hosts)


@pytest.mark.timeout(400)
def test_tune_write_and_run_as_deepspeeds_runner_does(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "autotuning": {
            "enabled": True, "tuner_type": "model_based", "start_profile_step": 1,
            "end_profile_step": 3, "zero_stages": [0], "offload": ["none"],
            "micro_batch_sizes": [1, 2], "memory_per_device_gb": 4, "trial_timeout_s": 120,
        },
    }))  # fmt: skip
    tuner = Autotuner(_runner_args(SCRIPT, cfg, num_gpus=2), {"localhost": [0, 1]})
    assert (tuner.exp_num_nodes, tuner.exp_num_gpus) == (1, 2)
    # DeepSpeed's runner: tune, print, write, then (for `run`) train with the answer
    tuner.tune()
    tuner.print_tuning_results()
    tuner.write_optimal_config()
    result = tuner.result
    assert result is not None and result.best is not None
    # one device group of 2, ZeRO 0, micro-batch 2 (the larger one fits; 1 is its fallback)
    assert (result.best.stage, result.best.micro_batch, result.best.grad_accum) == (0, 2, 2)
    results = tmp_path / "autotuning_results"
    optimal = json.loads((results / "ds_config_optimal.json").read_text())
    assert optimal == tuner.optimal_ds_config
    assert optimal["train_micro_batch_size_per_gpu"] == 2 and "autotuning" not in optimal
    cmd = shlex.split((results / "cmd_optimal.txt").read_text())
    assert cmd[1:5] == ["-m", "ds_launcher", "--num_gpus", "2"]
    assert cmd[cmd.index("--deepspeed_config") + 1] == str(results / "ds_config_optimal.json")
    assert tuner.run_after_tuning() == 0
