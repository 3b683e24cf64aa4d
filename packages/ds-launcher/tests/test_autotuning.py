"""`--autotuning tune|run`: parsed like DeepSpeed's flag and handed to ds-profile's autotuner
as a child process (ds-launch imports nothing of it)."""

from __future__ import annotations

import json
import sys

import pytest

from ds_launcher import _autotuning
from ds_launcher._cli import build_parser, split_argv
from ds_launcher._errors import LauncherError
from ds_launcher._options import NOT_IMPLEMENTED


def test_flag_parsed_with_deepspeed_choices():
    assert "--autotuning" not in NOT_IMPLEMENTED
    options, program = split_argv(
        ["--num_gpus", "2", "--autotuning", "tune", "train.py", "--deepspeed_config", "c.json"]
    )
    ns = build_parser().parse_args(options)
    assert ns.autotuning == "tune" and program == ["train.py", "--deepspeed_config", "c.json"]
    assert build_parser().parse_args([]).autotuning == ""
    with pytest.raises(LauncherError, match="invalid choice: 'fast'"):
        build_parser().parse_args(["--autotuning=fast"])


def test_autotuner_argv():
    argv = _autotuning.autotuning_argv("run", 4, ["--num_gpus=2", "--autotuning=run", "--master_port=1234"],
                                       ["train.py", "--deepspeed_config", "c.json"])  # fmt: skip
    assert argv[:5] == [sys.executable, "-m", "ds_profile.autotune", "run", "--world_size"]
    assert argv[5] == "4"
    assert json.loads(argv[7]) == ["--num_gpus=2", "--master_port=1234"]
    assert argv[8:] == ["--", "train.py", "--deepspeed_config", "c.json"]


def test_missing_autotuner_or_script(monkeypatch):
    with pytest.raises(LauncherError, match="needs the training script"):
        _autotuning.run_autotuning("tune", 1, [], [])
    monkeypatch.setattr(_autotuning.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LauncherError, match="pip install ds-profile"):
        _autotuning.run_autotuning("tune", 1, [], ["train.py"])
