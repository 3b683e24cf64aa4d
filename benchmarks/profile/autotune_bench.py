"""Autotuner on one GPU: our tuner's pick against the exhaustive grid, and DeepSpeed 0.19.8's
autotuner on the same space.

For each model (the 1.34B GPT: d=2048, 24 layers; a 6B GPT: d=4096, 30 layers; vocab 32768,
seq 1024, bf16, AdamW, global batch kept), three sessions, each from scratch (own profile run),
all training the same GPT (shared/peers/tinygpt.py through gpt_trial.py):

1. ``ds-launch --autotuning tune`` with the model-based tuner (``fast``, early stopping);
2. the same driver as an exhaustive grid (``gridsearch``, no pruning, no early stopping): every
   configuration the memory estimator admits, each a real trial;
3. ``deepspeed --autotuning tune`` (DeepSpeed 0.19.8, ``fast``) over ZeRO stages x micro-batch
   sizes (its tuner has no offload or checkpointing dimension: its space is the grid's subset
   without them). A space without "none" among its offloads (a model that fits only offloaded)
   puts the space's lightest offload into its config, as a user of its tuner would; DeepSpeed
   0.19.8's tuner drops it (each experiment's ``zero_optimization`` is rebuilt from its stage
   template and tuning space, which have no offload keys) and its memory estimate then rules
   out the stages that do not fit unoffloaded: the results record what it ran (each trial's
   ``offload``). It runs with its own launcher and engine. Its config names the micro-batch list and
   ``gradient_accumulation_steps`` = global batch / largest micro-batch, so that DeepSpeed keeps
   the same global batch for every micro-batch (left to itself it keeps the accumulation steps
   and changes the global batch), and ``torch_adam`` (torch's AdamW, as ours uses), so that no
   trial compiles DeepSpeed's FusedAdam. Its engine measures its own metric: ``latency`` is
   the trimmed mean of its forward + backward + step timers times the accumulation steps, in
   microseconds (its timers' milliseconds multiplied by 1000 once more), so ``throughput`` =
   train_batch_size x 1e6 / latency is samples/s.

Reported per model: each session's time to answer and the throughput (samples/s) of its pick,
measured by the grid (the same trial under the same engine; DeepSpeed's pick is also reported as
DeepSpeed itself measured it). Targets: tuner pick within 5% of the grid's best, tuner time at
most 1/3 of the grid's. A table (``autotune-trials-<device>.md``) and a chart
(``autotune-trials-<device>.png``, matplotlib when installed) of every trial of every session
go next to the results JSON (``$OUT`` when set), with each session's own summary.txt,
summary.json and trials.png under ``autotune-sessions/``.

Time: ``--deadline-s`` bounds the whole run (results written before it). Per model the tuner
gets at most a quarter of the model's share, the grid what is left minus the share kept for
DeepSpeed (``--deepspeed-share``), DeepSpeed the rest. Our sessions stop themselves at their
limit (``autotuning.session_timeout_s``: no trial starts after it, a running one is stopped,
the report of finished trials is written); DeepSpeed's has no such limit, so its process group
is stopped at its limit and its finished trials are read from its ``autotuning_results/``
layout (``<exp>/exp.json``, ``ds_config.json``, ``metrics.json``, ``stderr.log``) and recorded
as not finished.

    # the GPU session's preset (bash benchmarks/gpu_session.sh autotune): expected about 5
    # minutes on one H100 (tuner ~1, grid ~1.5, DeepSpeed ~2.5: three processes and a 5-10 s
    # polling wait per trial), never past --deadline-s (525 s); needs tabulate among the wheels
    # in .whl/ for DeepSpeed's autotuner (else its session is reported as not started)
    python benchmarks/profile/autotune_bench.py --models 1.3b --stages 0,3 --offload none \\
        --micro-batches 2,4 --global-batch 16 --peers-dir shared/peers
    # the full comparison (about an hour)
    python benchmarks/profile/autotune_bench.py --models 1.3b,6b --deadline-s 3600
    # the 6B space in 10-minute commands of one lease (same machine, /tmp kept): the tuner
    # alone (a quarter of a command, its share next to the grid, is less than one 6B trial),
    # then the grid (a second grid command with --resume if one does not hold it), then
    # DeepSpeed's; each command merges the previous one's results
    S6="--models 6b --stages 2,3 --offload optimizer,optimizer+param --micro-batches 1,2,4"
    python benchmarks/profile/autotune_bench.py $S6 --sessions tuner --out-dir /tmp/at6
    python benchmarks/profile/autotune_bench.py $S6 --sessions grid --deepspeed-share 0 \
        --merge /tmp/at6/autotune-<device>-<date>.json --out-dir /tmp/at6
    python benchmarks/profile/autotune_bench.py $S6 --sessions deepspeed --deepspeed-share 1 \
        --merge /tmp/at6/autotune-<device>-<date>.json --out-dir /tmp/at6

``--sessions`` picks which of the three run now (the time goes to those); ``--merge FILE``
takes the sessions not run now from an earlier results file of this benchmark; ``--resume``
keeps our sessions' folders, so a session that was stopped at its limit resumes from its
finished trials (``overwrite: false``), and its time to answer is the sum of its commands'
wall times (each command's start-up counted: a resumed grid is charged more, not less).
    # every path on a CPU (tiny GPT, gloo, DS_ACCELERATOR=cpu; DeepSpeed from /work/dsenv)
    python benchmarks/profile/autotune_bench.py --tiny --deepspeed-site /tmp/atb_site
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pythonpath import pythonpath  # noqa: E402
from _results import device_slug, write_results  # noqa: E402

#: "tiny" is for the CPU run of the benchmark itself (--tiny)
MODELS = {
    "1.3b": {"d": 2048, "layers": 24},
    "6b": {"d": 4096, "layers": 30},
    "tiny": {"d": 128, "layers": 2},
}
DSENV_PYTHON = Path("/work/dsenv/bin/python")
#: what DeepSpeed 0.19.8's autotuner imports beyond DeepSpeed itself (tabulate is optional in
#: its package metadata, but its Autotuner asserts it)
DS_AUTOTUNER_IMPORTS = (
    "import deepspeed, hjson, tabulate, tqdm; from deepspeed.autotuning import Autotuner"
)


class Clock:
    """The run's deadline, as seconds left."""

    def __init__(self, total_s: float) -> None:
        self.end = time.monotonic() + total_s

    def left(self) -> float:
        return self.end - time.monotonic()


def _env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": pythonpath(alias=False), "PYTHONUNBUFFERED": "1"}
    if args.tiny:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def _ds_env(args: argparse.Namespace, work: Path, base: dict[str, str]) -> dict[str, str]:
    """DeepSpeed's session: its interpreter, extra site dir, and a ``deepspeed`` command on PATH
    (its autotuner starts every trial as ``deepspeed --hostfile ... --include localhost:0 ...``;
    a wheel installed with --target has no console script)."""
    env = dict(base)
    if args.deepspeed_site:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(args.deepspeed_site).resolve()), env["PYTHONPATH"]]
        )
    shim = work / "bin"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "deepspeed").write_text(
        f'#!/bin/sh\nexec {args.deepspeed_python} -m deepspeed.launcher.runner "$@"\n'
    )
    (shim / "deepspeed").chmod(0o755)
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    # DeepSpeed's autotuner logs to MLflow whenever mlflow imports, and then reads
    # MLFLOW_RUN_ID (a KeyError when unset): without a run to log to, it must not see mlflow
    find = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('mlflow') else 1)"
    try:
        has_mlflow = (
            subprocess.run([args.deepspeed_python, "-c", find], env=env, check=False).returncode
            == 0
        )
    except OSError:  # no such interpreter: the session's own check reports it
        has_mlflow = False
    if has_mlflow and "MLFLOW_RUN_ID" not in env:
        hide = work / "no_mlflow" / "mlflow"
        hide.mkdir(parents=True, exist_ok=True)
        (hide / "__init__.py").write_text(
            'raise ImportError("mlflow hidden from DeepSpeed\'s autotuner (no MLFLOW_RUN_ID)")\n'
        )
        env["PYTHONPATH"] = os.pathsep.join([str(hide.parent), env["PYTHONPATH"]])
    return env


def _base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "train_batch_size": args.global_batch,
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }


def _script_args(model: str, args: argparse.Namespace, cfg: Path, impl: str) -> list[str]:
    m = MODELS[model]
    out = [str(HERE / "gpt_trial.py"), "--deepspeed", "--deepspeed_config", str(cfg), "--impl", impl,
           "--d", str(m["d"]), "--layers", str(m["layers"]), "--seq", str(args.seq)]  # fmt: skip
    if args.tiny:
        out += ["--vocab", "512"]
    # absolute: every trial runs in its own experiment folder
    return out + ["--peers-dir", str(args.peers_dir)]


def _run_bounded(argv: list[str], env: dict[str, str], cwd: Path, limit_s: float,
                 log: Path) -> tuple[int, float, bool]:  # fmt: skip
    """Run ``argv`` in its own process group, output to ``log``; at ``limit_s`` the whole group
    (the launcher, its trial launchers and their ranks) is stopped. (exit code, seconds,
    stopped)."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=max(1.0, limit_s)), time.perf_counter() - t0, False
        except subprocess.TimeoutExpired:
            pass
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return 124, time.perf_counter() - t0, True


def _ours(model: str, args: argparse.Namespace, work: Path, grid: bool, env: dict[str, str],
          limit_s: float) -> dict[str, Any]:  # fmt: skip
    """One session of our autotuner (tuner or exhaustive grid): its summary and wall time.
    With ``--resume`` its folder is kept and it resumes from the trials it finished before."""
    name = "grid" if grid else "tuner"
    d = work / model / name
    if not args.resume:
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    # the session stops itself (and writes its report) before the backstop below stops it
    session_s = max(5.0, limit_s - 15)
    auto: dict[str, Any] = {
        "enabled": True, "overwrite": not args.resume, "results_dir": str(d / "results"), "exps_dir": str(d / "exps"),
        "start_profile_step": args.start_step, "end_profile_step": args.end_step,
        "zero_stages": args.stages, "offload": args.offload, "micro_batch_sizes": args.micro_batches,
        "trial_timeout_s": min(args.trial_timeout, session_s), "session_timeout_s": session_s,
    }  # fmt: skip
    if args.checkpointing:
        auto["activation_checkpointing_arg"] = "--gradient_checkpointing"
    if grid:
        auto.update(
            tuner_type="gridsearch", fast=False, tuner_early_stopping=10**6, tuner_num_trials=10**6
        )
    else:
        auto.update(tuner_type="model_based", fast=True, tuner_early_stopping=args.early_stopping)
    cfg = d / "ds_config.json"
    cfg.write_text(json.dumps({**_base_config(args), "autotuning": auto}, indent=2))
    argv = [sys.executable, "-m", "ds_launcher", "--autotuning", "tune", "--num_gpus", "1",
            *_script_args(model, args, cfg, "ours")]  # fmt: skip
    rc, wall, stopped = _run_bounded(argv, env, d, limit_s, d / "session.log")
    summary_path = d / "results" / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:  # no report: what finished is in results/trials/
        summary = {"best": None, "best_value": None, "trials": _our_finished(d / "results")}
        tail = (d / "session.log").read_text(errors="replace")[-1500:]
        summary["error"] = f"exit {rc}{' (stopped at its limit)' if stopped else ''}: {tail}"
    summary.update(wall_s=wall, limit_s=limit_s, finished=not stopped and not summary.get("timed_out"),
                   results_dir=str(d / "results"))  # fmt: skip
    return summary


def _our_finished(results: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((results / "trials").glob("*.json")):
        rec = json.loads(f.read_text())
        rows.append(
            {
                "name": rec["name"],
                **rec["candidate"],
                "status": rec["status"],
                "value": rec["value"],
            }
        )
    return rows


def _ds_offload(args: argparse.Namespace) -> str:
    """The offload DeepSpeed's config asks for. Its tuner has no offload dimension, so none,
    unless the space has no "none" (a model that fits only offloaded): then the lightest
    offload of the space, fixed, as a user of its tuner would set it (which it drops)."""
    if "none" in args.offload:
        return "none"
    return "optimizer" if "optimizer" in args.offload else "optimizer+param"


def _ds_config(args: argparse.Namespace, d: Path) -> dict[str, Any]:
    """DeepSpeed's tuning space: the micro-batch list, stages, the global batch kept through
    gradient_accumulation_steps (no train_batch_size: its profile run sets micro-batch 1), and
    the offload of ``_ds_offload``."""
    top = max(args.micro_batches)
    if args.global_batch % top:
        raise SystemExit(
            f"--global-batch {args.global_batch} must be a multiple of the largest micro-batch {top}"
        )
    base = _base_config(args)
    del base["train_batch_size"]
    zero: dict[str, Any] = {"stage": list(args.stages)}
    offload = _ds_offload(args)
    if offload == "none":
        base["optimizer"]["params"]["torch_adam"] = True
    else:
        # its ZeRO-Offload steps with its own CPU Adam (torch's optimizer is refused there)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if offload == "optimizer+param":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {**base, "gradient_accumulation_steps": args.global_batch // top,
            "train_micro_batch_size_per_gpu": list(args.micro_batches),
            "zero_optimization": zero,
            "autotuning": {
                "enabled": True, "fast": True, "overwrite": True,
                "results_dir": str(d / "autotuning_results"), "exps_dir": str(d / "autotuning_exps"),
                "start_profile_step": args.start_step, "end_profile_step": args.end_step,
                "tuner_early_stopping": args.early_stopping}}  # fmt: skip


def _offload_of(zero: dict[str, Any]) -> str:
    """A DeepSpeed ``zero_optimization`` section's offload, in this benchmark's names."""
    if (zero.get("offload_optimizer") or {}).get("device") not in ("cpu", "nvme"):
        return "none"
    param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    return "optimizer+param" if param else "optimizer"


def _ds_trials(results: Path) -> list[dict[str, Any]]:
    """Every experiment under DeepSpeed's results_dir: its config and, when it finished, its
    metrics (DeepSpeed's; its ``throughput`` is samples/s, see the module docstring)."""
    rows = []
    for exp_json in sorted(results.glob("*/exp.json")):
        exp = json.loads(exp_json.read_text())
        c = exp.get("ds_config") or {}
        metrics_file = exp_json.parent / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        stderr = exp_json.parent / "stderr.log"
        err = stderr.exists() and any(
            w in stderr.read_text(errors="replace") for w in ("Error", "error", "Traceback")
        )
        row: dict[str, Any] = {"name": exp.get("name", exp_json.parent.name)}
        if exp.get("name") != "profile_model_info":
            zero = c.get("zero_optimization") or {}
            row.update(stage=int(zero.get("stage", 0)), offload=_offload_of(zero),
                       micro_batch=c.get("train_micro_batch_size_per_gpu"),
                       grad_accum=c.get("gradient_accumulation_steps"))  # fmt: skip
        if metrics is not None:
            row.update(status="ok", deepspeed_metrics=metrics,
                       value=metrics.get("throughput"))  # fmt: skip
        elif (exp_json.parent / "model_info.json").exists():
            row.update(
                status="ok",
                model_info=json.loads((exp_json.parent / "model_info.json").read_text()),
            )
        else:
            row["status"] = "failed" if err else "unfinished"
        rows.append(row)
    return rows


def _deepspeed(model: str, args: argparse.Namespace, work: Path, env: dict[str, str],
               limit_s: float) -> dict[str, Any]:  # fmt: skip
    """DeepSpeed 0.19.8's autotuner on ZeRO stages x micro-batch sizes: its pick, its time, every
    trial it finished (also when it is stopped at its limit)."""
    d = work / model / "deepspeed"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        pre = subprocess.run([args.deepspeed_python, "-c", DS_AUTOTUNER_IMPORTS], env=env, cwd=d,
                             capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        pre = subprocess.CompletedProcess([], 1, "", str(exc))
    if pre.returncode != 0:
        return {"error": f"DeepSpeed's autotuner cannot start ({args.deepspeed_python}): "
                         f"{pre.stderr.strip().splitlines()[-1] if pre.stderr.strip() else pre.returncode}",
                "wall_s": None, "finished": False, "trials": []}  # fmt: skip
    cfg = d / "ds_config.json"
    cfg.write_text(json.dumps(_ds_config(args, d), indent=2))
    # one node, no hostfile: DeepSpeed's runner then takes the local GPUs (127.0.0.1, no ssh)
    argv = [args.deepspeed_python, "-m", "deepspeed.launcher.runner", "--autotuning", "tune",
            "--num_gpus", "1", *_script_args(model, args, cfg, "deepspeed")]  # fmt: skip
    rc, wall, stopped = _run_bounded(argv, env, d, limit_s, d / "session.log")
    results = d / "autotuning_results"
    trials = _ds_trials(results)
    out: dict[str, Any] = {"wall_s": wall, "limit_s": limit_s, "exit_code": rc, "finished": False,
                           "trials": trials}  # fmt: skip
    optimal = results / "ds_config_optimal.json"
    if optimal.exists() and not stopped:
        config = json.loads(optimal.read_text())
        zero = config.get("zero_optimization") or {}
        out.update(finished=True, config=config, stage=int(zero.get("stage", 0)),
                   offload=_offload_of(zero),
                   micro_batch=int(config.get("train_micro_batch_size_per_gpu", 1)),
                   grad_accum=int(config.get("gradient_accumulation_steps", 1)))  # fmt: skip
    else:
        done = [t for t in trials if t.get("value") is not None]
        why = (
            f"stopped at its {limit_s:.0f} s limit"
            if stopped
            else f"exit {rc}, no ds_config_optimal.json"
        )
        tail = (d / "session.log").read_text(errors="replace")[-1200:]
        out["error"] = f"not finished ({why}); {len(done)} trials measured: {tail}"
        if not done:
            return out
        # its best finished trial so far, by its own metric
        best = max(done, key=lambda t: t["value"])
        out.update({k: best[k] for k in ("stage", "offload", "micro_batch", "grad_accum")})
    for t in trials:
        if (t.get("stage"), t.get("micro_batch"), t.get("grad_accum")) == (
            out["stage"],
            out["micro_batch"],
            out["grad_accum"],
        ):
            out["deepspeed_reported"] = t.get("deepspeed_metrics")
            out["deepspeed_samples_per_s"] = t.get("value")
    return out


def _grid_value(grid: dict[str, Any], **want: Any) -> float | None:
    for t in grid.get("trials", []):
        if all(t.get(k) == v for k, v in want.items()) and t.get("value") is not None:
            return float(t["value"])
    return None


def _measured(trials: list[dict[str, Any]]) -> int:
    return len(
        [t for t in trials if t.get("value") is not None and t.get("name") != "profile_model_info"]
    )


def _copy_sessions(work: Path, model: str, dest: Path) -> None:
    for name in ("tuner", "grid"):
        src = work / model / name / "results"
        for f in ("summary.txt", "summary.json", "trials.png"):
            if (src / f).exists():
                (dest / model / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(src / f, dest / model / name / f)
    src = work / model / "deepspeed" / "autotuning_results"
    for f in ("summary.txt", "ds_config_optimal.json"):
        if (src / f).exists():
            (dest / model / "deepspeed").mkdir(parents=True, exist_ok=True)
            shutil.copy(src / f, dest / model / "deepspeed" / f)


def _table(detail: dict[str, Any]) -> str:
    """Every trial of every session, one row each (samples/s as each engine measured it)."""
    lines = ["| model | session | trial | stage | offload | mbs | gas | ac | status | samples/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for model, sessions in detail.items():
        for session, s in sessions.items():
            for t in s.get("trials", []):
                v = t.get("value")
                lines.append(
                    f"| {model} | {session} | {t.get('name')} | {t.get('stage', '')} | {t.get('offload', 'none' if session == 'deepspeed' else '')} "
                    f"| {t.get('micro_batch', '')} | {t.get('grad_accum', '')} | {'y' if t.get('checkpointing') else 'n'} "
                    f"| {t.get('status')} | {'' if v is None else f'{v:.4g}'} |"
                )  # fmt: skip
    return "\n".join(lines) + "\n"


def _chart(detail: dict[str, Any], path: Path) -> str | None:
    """A bar per trial per session (samples/s); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart (the table has every trial)"
    fig, axes = plt.subplots(len(detail), 1, figsize=(10, 3.5 * len(detail)), squeeze=False)
    colors = {"tuner": "tab:blue", "grid": "tab:grey", "deepspeed": "tab:orange"}
    for ax, (model, sessions) in zip(axes[:, 0], detail.items(), strict=True):
        labels, values, cols = [], [], []
        for session, s in sessions.items():
            for t in s.get("trials", []):
                if t.get("name") == "profile_model_info" or t.get("status") in (
                    "rejected",
                    "skipped",
                ):
                    continue
                labels.append(f"{session}\n{t.get('name')}")
                values.append(t.get("value") or 0.0)
                cols.append(colors.get(session, "tab:green") if t.get("value") else "tab:red")
        ax.bar(range(len(values)), values, color=cols)
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("samples/s")
        ax.set_title(f"{model}: every trial (red: failed or not finished)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _runs(model: str, tuner: dict[str, Any], grid: dict[str, Any], ds: dict[str, Any]
          ) -> tuple[list[dict[str, Any]], dict[str, float]]:  # fmt: skip
    runs: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    grid_best = grid.get("best_value") if grid.get("finished") else None
    tuner_pick = grid_value = None
    if tuner.get("best"):
        tuner_pick = tuner.get("best_value")
        grid_value = _grid_value(grid, **tuner["best"])  # the same config as the grid measured it
    runs.append({"system": f"ds-profile-tuner-{model}", "peak_mem_gb": _peak_mem_gb(tuner),
                 "time_to_answer_s": round(tuner["wall_s"], 1) if tuner.get("best") else None,
                 "best_samples_per_s": tuner_pick, "pick_in_grid_samples_per_s": grid_value,
                 "trials": _measured(tuner.get("trials", [])), "pick": tuner.get("best"),
                 "finished": tuner.get("finished"), **({"error": tuner["error"]} if "error" in tuner else {})})  # fmt: skip
    runs.append({"system": f"exhaustive-grid-{model}", "peak_mem_gb": _peak_mem_gb(grid),
                 "time_to_answer_s": round(grid["wall_s"], 1) if grid.get("finished") else None,
                 "best_samples_per_s": grid.get("best_value"), "pick": grid.get("best"),
                 "trials": _measured(grid.get("trials", [])), "finished": grid.get("finished"),
                 **({"error": grid["error"]} if "error" in grid else {})})  # fmt: skip
    if not grid.get("finished") and "error" not in grid:
        runs[-1]["error"] = (
            f"stopped at its {grid.get('limit_s', 0):.0f} s limit before every trial ran"
        )
    if tuner.get("best") is None and "error" not in tuner:
        runs[0]["error"] = "no pick (no trial finished)"
    ds_run: dict[str, Any] = {"system": f"deepspeed-0.19.8-autotuner-{model}", "peak_mem_gb": None,
                              "finished": ds.get("finished", False), "trials": _measured(ds.get("trials", []))}  # fmt: skip
    if "skipped" in ds:
        ds_run["skipped"] = ds["skipped"]
    if "stage" in ds:
        ds_offload = ds.get("offload", "none")
        ds_run.update(pick={"stage": ds["stage"], "offload": ds_offload, "micro_batch": ds["micro_batch"],
                            "grad_accum": ds["grad_accum"]},
                      deepspeed_reported=ds.get("deepspeed_reported"),
                      deepspeed_samples_per_s=ds.get("deepspeed_samples_per_s"),
                      best_samples_per_s=_grid_value(grid, stage=ds["stage"], offload=ds_offload, micro_batch=ds["micro_batch"],
                                                     grad_accum=ds["grad_accum"], checkpointing=False))  # fmt: skip
    if ds.get("finished"):
        ds_run["time_to_answer_s"] = round(ds["wall_s"], 1)
    elif ds.get("wall_s") is not None:
        ds_run["stopped_after_s"] = round(ds["wall_s"], 1)
    if "error" in ds:
        ds_run["error"] = ds["error"]
    runs.append(ds_run)
    if grid_best and (grid_value or tuner_pick):
        ratios[f"{model} tuner pick / grid best samples_per_s"] = round(
            (grid_value or tuner_pick) / grid_best, 3
        )
    if runs[0]["time_to_answer_s"] and runs[1]["time_to_answer_s"]:
        ratios[f"{model} tuner / grid time_to_answer_s"] = round(
            tuner["wall_s"] / grid["wall_s"], 3
        )
    if ds_run.get("best_samples_per_s") and grid_best:
        ratios[f"{model} deepspeed pick / grid best samples_per_s"] = round(
            ds_run["best_samples_per_s"] / grid_best, 3
        )
    if ds_run.get("time_to_answer_s") and runs[0]["time_to_answer_s"]:
        ratios[f"{model} deepspeed / tuner time_to_answer_s"] = round(
            ds_run["time_to_answer_s"] / tuner["wall_s"], 3
        )
    return runs, ratios


def _device_name(tiny: bool) -> str:
    import torch

    if torch.cuda.is_available() and not tiny:
        return f"1 x {torch.cuda.get_device_name()}"
    return "cpu"


def _peak_mem_gb(session: dict[str, Any]) -> float | None:
    """The peak device memory of a session's pick, as its trial measured it."""
    path = session.get("results_dir")
    best = session.get("best")
    if not path or not best:
        return None
    for f in (Path(path) / "trials").glob("*.json"):
        rec = json.loads(f.read_text())
        if rec.get("candidate") == best:
            v = (rec.get("metrics") or {}).get("peak_mem_gb")
            return round(float(v), 2) if isinstance(v, (int, float)) else None
    return None


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="1.3b,6b", help="comma list of 1.3b, 6b")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--offload", default="none,optimizer,optimizer+param")
    ap.add_argument("--micro-batches", default="1,2,4,8")
    ap.add_argument(
        "--checkpointing", action="store_true", help="add activation checkpointing to the space"
    )
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--start-step", type=int, default=2, help="autotuning.start_profile_step")
    ap.add_argument("--end-step", type=int, default=4, help="autotuning.end_profile_step")
    ap.add_argument("--early-stopping", type=int, default=2, help="autotuning.tuner_early_stopping")
    ap.add_argument("--trial-timeout", type=float, default=240, help="seconds per trial (ours)")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=525,
        help="the whole run, results written (gpu_session.sh's wheel install and start-up "
        "take the rest of its 10-minute command)",
    )
    ap.add_argument("--deepspeed-share", type=float, default=0.4,
                    help="share of each model's time kept for DeepSpeed's session")  # fmt: skip
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument("--sessions", default="tuner,grid,deepspeed",
                    help="which sessions run now (comma list of tuner, grid, deepspeed)")  # fmt: skip
    ap.add_argument("--merge", metavar="FILE",
                    help="an earlier results file: the sessions not run now come from it")  # fmt: skip
    ap.add_argument("--resume", action="store_true",
                    help="keep our sessions' folders: resume from their finished trials")  # fmt: skip
    ap.add_argument("--deepspeed-python", help="interpreter with DeepSpeed 0.19.8 (default: this one; "
                    "--tiny: /work/dsenv/bin/python when present)")  # fmt: skip
    ap.add_argument(
        "--deepspeed-site", help="a folder put first on DeepSpeed's PYTHONPATH (tabulate)"
    )
    ap.add_argument("--peers-dir", default=str(ROOT / "shared" / "peers"))
    ap.add_argument("--work", default="/tmp/autotune_bench")
    ap.add_argument("--device-name", help="the device named in the results (default: detected)")
    ap.add_argument("--out-dir", help="results folder (default benchmarks/results; --tiny: --work)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU run of every path: tiny GPT, seq 32, DS_ACCELERATOR=cpu, gloo")  # fmt: skip
    args = ap.parse_args()
    if args.tiny:
        args.models, args.seq = "tiny", 32
        if args.deepspeed_python is None and DSENV_PYTHON.exists():
            args.deepspeed_python = str(DSENV_PYTHON)
    args.deepspeed_python = args.deepspeed_python or sys.executable
    args.stages = [int(s) for s in args.stages.split(",")]
    args.offload = args.offload.split(",")
    args.micro_batches = [int(m) for m in args.micro_batches.split(",")]
    args.sessions = args.sessions.split(",")
    bad = sorted(set(args.sessions) - {"tuner", "grid", "deepspeed"})
    if bad or not args.sessions:
        ap.error(
            f"--sessions: unknown {', '.join(bad) or 'empty list'} (known: tuner, grid, deepspeed)"
        )
    if args.merge and not Path(args.merge).is_file():
        ap.error(f"--merge {args.merge}: no such results file")
    if args.resume and not args.merge:
        ap.error("--resume needs --merge: the earlier command's results carry the time spent")
    args.peers_dir = Path(args.peers_dir).resolve()
    if not (args.peers_dir / "tinygpt.py").is_file():
        ap.error(f"--peers-dir {args.peers_dir} has no tinygpt.py")
    for m in args.models.split(","):
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r} (known: {', '.join(MODELS)})")
    return args


NOT_RUN: dict[str, Any] = {"wall_s": None, "finished": False, "trials": [], "best": None}


def _session(now: dict[str, Any] | None, earlier: dict[str, Any] | None, resume: bool
             ) -> dict[str, Any]:  # fmt: skip
    """A session's summary: the one run now (None: not run now; with ``resume`` its wall time is
    added to the earlier command's, whose trials it resumed), else the earlier results file's,
    else marked as not run."""
    if now is None:
        return earlier if earlier is not None else {**NOT_RUN, "error": "not run (--sessions)"}
    if resume and earlier and earlier.get("wall_s") is not None and now.get("wall_s") is not None:
        now["wall_s"] += earlier["wall_s"]
        now["commands"] = earlier.get("commands", 1) + 1
    return now


def main() -> None:
    args = _parse()
    clock = Clock(args.deadline_s - 10)  # 10 s kept for writing the results
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = _env(args, work)
    ds_env = _ds_env(args, work, env)

    runs: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    detail: dict[str, Any] = {}
    models = args.models.split(",")
    earlier: dict[str, Any] = (
        json.loads(Path(args.merge).read_text())["detail"] if args.merge else {}
    )
    want = set(args.sessions)
    if args.skip_deepspeed:
        want.discard("deepspeed")
    for i, model in enumerate(models):
        budget = clock.left() / (len(models) - i)
        model_end = time.monotonic() + budget
        before = earlier.get(model, {})
        # the model's time goes to the sessions run now: the tuner a quarter (all of it alone),
        # DeepSpeed its share (all of it alone), the grid the rest
        ds_share = 0.0 if "deepspeed" not in want else (
            budget if want == {"deepspeed"} else args.deepspeed_share * budget)  # fmt: skip
        tuner_s = budget if want == {"tuner"} else 0.25 * budget
        now = None
        if "tuner" in want:
            now = _ours(model, args, work, grid=False, env=env, limit_s=tuner_s)
        tuner = _session(now, before.get("tuner"), args.resume)
        now = None
        if "grid" in want:
            limit = model_end - time.monotonic() - ds_share
            now = _ours(model, args, work, grid=True, env=env, limit_s=limit)
        grid = _session(now, before.get("grid"), args.resume)
        if args.skip_deepspeed:
            ds: dict[str, Any] = {"skipped": "--skip-deepspeed"}
        else:
            now = None
            if "deepspeed" in want:
                now = _deepspeed(model, args, work, ds_env, limit_s=model_end - time.monotonic())
            ds = _session(now, before.get("deepspeed"), resume=False)
        detail[model] = {"tuner": tuner, "grid": grid, "deepspeed": ds}
        r, q = _runs(model, tuner, grid, ds)
        runs += r
        ratios.update(q)

    # named after the trials: a CUDA context in this process would hold device memory meanwhile
    device = args.device_name or _device_name(args.tiny)
    out_dir = Path(args.out_dir) if args.out_dir else (work if args.tiny else None)
    slug = device_slug(device)
    # --out-dir is a folder even before it exists (write_results takes a missing path for a
    # file name); the table, chart and sessions go next to the JSON, and to $OUT as well
    out_env = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    art_dir = out_dir or out_env or ROOT / "benchmarks" / "results"
    art_dir.mkdir(parents=True, exist_ok=True)
    (art_dir / f"autotune-trials-{slug}.md").write_text(_table(detail))
    chart_note = _chart(detail, art_dir / f"autotune-trials-{slug}.png")
    for model in models:
        _copy_sessions(work, model, art_dir / "autotune-sessions")
    if out_env is not None and out_env.resolve() != art_dir.resolve():
        out_env.mkdir(parents=True, exist_ok=True)
        for name in (f"autotune-trials-{slug}.md", f"autotune-trials-{slug}.png"):
            if (art_dir / name).is_file():
                shutil.copy2(art_dir / name, out_env / name)
    path = write_results(
        scenario="autotune", device=device, runs=runs, ratios=ratios, path=out_dir,
        metric=["time_to_answer_s", "best_samples_per_s"], targets={
            "tuner pick / grid best samples_per_s": ">= 0.95", "tuner / grid time_to_answer_s": "<= 0.333"},
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "work"},
        table=f"autotune-trials-{slug}.md", chart=chart_note or f"autotune-trials-{slug}.png",
        detail=detail,
    )  # fmt: skip
    print(_table(detail))
    print(
        json.dumps(
            {"results": str(path), "ratios": ratios, "seconds_left": round(clock.left() + 10, 1)},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
