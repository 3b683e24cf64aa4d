"""Trials on disk and their launch.

Layout (JSON only):
  results_dir/trials/<name>.json   one finished trial: candidate, status, metrics, estimate
  results_dir/launch_log.jsonl     one line per launch (the candidate and its memory estimate),
                                   appended before the process starts
  exps_dir/<name>/ds_config.json   the generated config; stdout.log / stderr.log; metric.json

A trial is a real launch of the user's script through ds-launch (as a subprocess, argv lists
only) with ``--deepspeed_config`` (or ``--deepspeed``) pointing at the generated config and the
``arg_mappings`` flags set; the engine measures between the profile steps, writes metric.json
and exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_profile.autotune._settings import AutotuneSettings
from ds_profile.autotune._space import Candidate

CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed")


@dataclass(frozen=True)
class Job:
    """How to start the user's job: ds-launch's options, the script and its arguments."""

    launcher_args: tuple[str, ...]
    script: str
    script_args: tuple[str, ...]

    def _config_slot(self) -> tuple[int, bool] | None:
        """(index, glued) of the config file argument: the word after ``--deepspeed_config``
        (or its ``=`` form), else after ``--deepspeed`` when that is a file name (Hugging
        Face's ``--deepspeed ds.json``; a bare ``--deepspeed`` switch is left alone)."""
        args = self.script_args
        for flag in CONFIG_FLAGS:
            for i, a in enumerate(args):
                if a == flag and i + 1 < len(args) and not args[i + 1].startswith("-"):
                    return i + 1, False
                if a.startswith(flag + "="):
                    return i, True
        return None

    def config_path(self) -> str:
        slot = self._config_slot()
        if slot is None:
            raise ValueError(
                "autotuning: the script's arguments name no config file; pass it as "
                "--deepspeed_config ds_config.json (or --deepspeed ds_config.json)"
            )
        i, glued = slot
        return self.script_args[i].split("=", 1)[1] if glued else self.script_args[i]

    def argv(self, config_path: str, overrides: dict[str, str]) -> list[str]:
        """ds-launch's argv with the config replaced and ``overrides`` (flag -> value; value ""
        for a bare switch) set in the script's arguments."""
        args = list(self.script_args)
        slot = self._config_slot()
        if slot is None:
            raise ValueError(
                "autotuning: the script's arguments name no config file (--deepspeed_config)"
            )
        i, glued = slot
        args[i] = f"{args[i].split('=', 1)[0]}={config_path}" if glued else config_path
        for flag, value in overrides.items():
            if flag in args:
                i = args.index(flag)
                if value != "":
                    args[i + 1] = value
            else:
                args += [flag] if value == "" else [flag, value]
        return [sys.executable, "-m", "ds_launcher", *self.launcher_args, self.script, *args]


def script_overrides(cand: Candidate, settings: AutotuneSettings) -> dict[str, str]:
    mapping = settings.arg_mappings or {}
    values = {
        "train_micro_batch_size_per_gpu": str(cand.micro_batch),
        "gradient_accumulation_steps": str(cand.grad_accum),
    }
    out = {flag: values[key] for key, flag in mapping.items() if key in values}
    if cand.checkpointing and settings.activation_checkpointing_arg:
        out[settings.activation_checkpointing_arg] = ""
    return out


class TrialStore:
    def __init__(self, results_dir: Path, exps_dir: Path) -> None:
        self.results_dir = results_dir
        self.exps_dir = exps_dir
        (results_dir / "trials").mkdir(parents=True, exist_ok=True)
        exps_dir.mkdir(parents=True, exist_ok=True)

    def finished(self, name: str) -> dict[str, Any] | None:
        path = self.results_dir / "trials" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def record(self, name: str, record: dict[str, Any]) -> None:
        path = self.results_dir / "trials" / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)  # a trial is finished only once its file is whole

    def log_launch(self, entry: dict[str, Any]) -> None:
        with open(self.results_dir / "launch_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def launches(self) -> list[dict[str, Any]]:
        path = self.results_dir / "launch_log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def launch(job: Job, config: dict[str, Any], exp_dir: Path, overrides: dict[str, str],
           timeout_s: float) -> tuple[int, float]:  # fmt: skip
    """Write the config, run the job to completion; (exit code, seconds). Output goes to
    exp_dir/stdout.log and stderr.log."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = exp_dir / "ds_config.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    argv = job.argv(str(cfg_path), overrides)
    (exp_dir / "cmd.json").write_text(json.dumps(argv))
    start = time.perf_counter()
    with open(exp_dir / "stdout.log", "wb") as out, open(exp_dir / "stderr.log", "wb") as err:
        # its own session, so a trial past its time limit is stopped with every rank it started
        proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return rc, time.perf_counter() - start
