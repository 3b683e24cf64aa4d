"""DeepSpeed's ``deepspeed.autotuning.autotuner.Autotuner``, the object its launcher runs for
``--autotuning tune|run``: ``Autotuner(args, active_resources)`` then ``tune()``,
``print_tuning_results()``, ``write_optimal_config()`` and, for ``run``, ``run_after_tuning()``.

``args`` is the launcher's parsed command line (DeepSpeed's runner namespace: ``user_script``,
``user_args``, ``num_nodes``, ``num_gpus``, ``hostfile``, ``include``, ``exclude``,
``master_addr``, ``master_port``, ``launcher``) and ``active_resources`` its hosts and slots
(``{"host": [0, 1, ...]}``). The search is ds-profile's (its memory estimator rules configs out
before any launch, see its README); every trial is launched with ``python -m ds_launcher`` and
the launcher options above. Where DeepSpeed writes ``ds_config_optimal.json`` and
``cmd_optimal.txt`` into ``results_dir``, so does this.
"""

from __future__ import annotations

import json
import os
import shlex
from argparse import Namespace
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ds_all.autotuning.config import DeepSpeedAutotuningConfig
from ds_profile.autotune import Job, Result, run_best, script_overrides, tune

__all__ = ["Autotuner"]


def _exp_resources(
    args: Namespace, active_resources: Mapping[str, Sequence[int]]
) -> tuple[int, int]:
    """(nodes, devices per node) of every trial, as DeepSpeed counts them: the flags when set
    (> 0), else the active hosts and the first host's slots."""
    if not active_resources:
        raise ValueError(
            "Autotuner: active_resources is empty; pass the launcher's hosts and slots, "
            "e.g. {'localhost': [0]}"
        )
    nodes = int(getattr(args, "num_nodes", -1) or -1)
    gpus = int(getattr(args, "num_gpus", -1) or -1)
    if nodes <= 0:
        nodes = len(active_resources)
    if gpus <= 0:
        gpus = len(next(iter(active_resources.values())))
    return nodes, gpus


def _launcher_args(args: Namespace, nodes: int) -> list[str]:
    """ds-launch's options for every trial, from the launcher's: a host selection
    (``--include``/``--exclude``) or node and device counts (the two cannot be combined, as
    in DeepSpeed), the hostfile when it exists, the master address and port when given, and
    the multi-node launcher when the trials span ``nodes`` > 1 (DeepSpeed's runner uses it
    only then; its default, pdsh, need not be installed on one node). Each is an argv item:
    nothing goes through a shell."""
    out: list[str] = []
    hostfile = getattr(args, "hostfile", None)
    if hostfile and os.path.isfile(hostfile):
        out += ["--hostfile", str(hostfile)]
    include, exclude = getattr(args, "include", ""), getattr(args, "exclude", "")
    if include or exclude:
        out += ["--include", str(include)] if include else []
        out += ["--exclude", str(exclude)] if exclude else []
    else:
        for flag in ("num_nodes", "num_gpus"):
            value = getattr(args, flag, -1)
            if value is not None and int(value) > 0:
                out += [f"--{flag}", str(int(value))]
    for flag in ("master_addr", "master_port", "launcher"):
        if flag == "launcher" and nodes <= 1:
            continue
        value = getattr(args, flag, None)
        if value not in (None, ""):
            out += [f"--{flag}", str(value)]
    return out


class Autotuner:
    """See the module docstring. ``result`` holds the session's answer after ``tune()``."""

    args: Namespace
    job: Job
    user_config: dict[str, Any]
    autotuning_config: DeepSpeedAutotuningConfig
    exp_num_nodes: int
    exp_num_gpus: int
    result: Result | None
    optimal_cmd: list[str] | None
    optimal_ds_config: dict[str, Any] | None

    def __init__(self, args: Namespace, active_resources: Mapping[str, Sequence[int]]) -> None:
        self.args = args
        script = getattr(args, "user_script", None)
        if not script:
            raise ValueError("Autotuner: args.user_script is empty; name the training script")
        user_args = tuple(str(a) for a in (getattr(args, "user_args", None) or ()))
        self.exp_num_nodes, self.exp_num_gpus = _exp_resources(args, active_resources)
        self.job = Job(tuple(_launcher_args(args, self.exp_num_nodes)), str(script), user_args)
        path = Path(self.job.config_path())
        try:
            self.user_config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"Autotuner: cannot read the DeepSpeed config {path}: {exc}") from exc
        if not isinstance(self.user_config, dict):
            raise ValueError(f"Autotuner: {path} holds no JSON object")
        self.autotuning_config = DeepSpeedAutotuningConfig(self.user_config)
        self.result = None
        self.optimal_cmd = None
        self.optimal_ds_config = None

    # DeepSpeed's accessors
    def metric(self) -> str:
        return self.autotuning_config.metric

    def fast_enabled(self) -> bool:
        return self.autotuning_config.fast

    def mp_size(self) -> int:
        return self.autotuning_config.mp_size

    def max_train_batch_size(self) -> int | None:
        return self.autotuning_config.max_train_batch_size

    def tune(self) -> None:
        """Profile the model, rule out what does not fit, run the trials (ds-profile's
        search); the answer is in ``result``, ``optimal_ds_config`` and ``optimal_cmd``."""
        world = self.exp_num_nodes * self.exp_num_gpus
        self.result = tune(self.job, world)
        best = self.result.best
        if best is None or self.result.optimal_config_path is None:
            return
        path = self.result.optimal_config_path
        self.optimal_ds_config = json.loads(Path(path).read_text())
        # an absolute path: cmd_optimal.txt runs from any folder
        self.optimal_cmd = self.job.argv(
            str(Path(path).resolve()), script_overrides(best, self.autotuning_config.settings)
        )

    def print_tuning_results(self) -> None:
        """The trial table and the best configuration (also in ``results_dir/summary.txt``)."""
        if self.result is None:
            print("autotuning: no tuning results; call tune() first", flush=True)
            return
        best = self.result.best
        if best is None:
            print("autotuning: no trial succeeded; see the trials' stderr.log under "
                  f"{self.autotuning_config.exps_dir}", flush=True)  # fmt: skip
            return
        print(f"autotuning: best {best.name} ({self.metric()} {self.result.best_value:.4g}) "
              f"after {len(self.result.outcomes)} trials in {self.result.seconds:.1f} s; the "
              f"table is {Path(self.autotuning_config.results_dir) / 'summary.txt'}", flush=True)  # fmt: skip

    def write_optimal_config(self) -> None:
        """``ds_config_optimal.json`` (written by ``tune()``) and ``cmd_optimal.txt``, the
        command that trains with it, in ``results_dir``."""
        if self.optimal_cmd is None:
            print("autotuning: no optimal config to write (no trial succeeded)", flush=True)
            return
        out = Path(self.autotuning_config.results_dir) / "cmd_optimal.txt"
        out.write_text(shlex.join(self.optimal_cmd) + "\n")
        print(f"autotuning: wrote {out} and the config it names", flush=True)

    def run_after_tuning(self) -> int:
        """Train with the best configuration (``--autotuning run``); the job's exit code."""
        if self.result is None:
            raise RuntimeError("Autotuner.run_after_tuning: call tune() first")
        return run_best(self.job, self.result)
