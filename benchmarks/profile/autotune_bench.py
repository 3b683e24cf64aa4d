"""Autotuner on one GPU: our tuner's pick against the exhaustive grid, and DeepSpeed 0.19.8's
autotuner on the same space.

For each model (the 1.34B GPT: d=2048, 24 layers; a 6B GPT: d=4096, 30 layers; vocab 32768,
seq 1024, bf16, AdamW, global batch kept), three sessions, each from scratch (own profile run):

1. ``ds-launch --autotuning tune`` with the model-based tuner (``fast``, early stopping);
2. the same driver as an exhaustive grid (``gridsearch``, no pruning, no early stopping): every
   configuration the memory estimator admits, each a real trial;
3. ``deepspeed --autotuning tune`` (DeepSpeed 0.19.8) over ZeRO stages x micro-batch sizes (its
   tuner has no offload or checkpointing dimension: its space is the grid's subset without
   them), with its own launcher and engine.

Reported per model: each session's time to answer and the throughput (samples/s) of its pick,
measured by the grid (the same trial under the same engine; DeepSpeed's pick is also reported as
DeepSpeed itself measured it). Targets: tuner pick within 5% of the grid's best, tuner time at
most 1/3 of the grid's.

    # about 4 GPU-minutes on one H100 (the small preset: 1.34B, stages 0 and 3, mbs 2 and 4)
    python benchmarks/profile/autotune_bench.py --models 1.3b --stages 0,3 --offload none \\
        --micro-batches 2,4 --global-batch 16 --skip-deepspeed
    # the full comparison (about an hour)
    python benchmarks/profile/autotune_bench.py --models 1.3b,6b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pythonpath import pythonpath  # noqa: E402
from _results import write_results  # noqa: E402

#: "tiny" is for a CPU smoke run of the benchmark itself (DS_ACCELERATOR=cpu, --seq 32)
MODELS = {
    "1.3b": {"d": 2048, "layers": 24},
    "6b": {"d": 4096, "layers": 30},
    "tiny": {"d": 128, "layers": 2},
}


def _env(work: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": pythonpath(alias=False), "PYTHONUNBUFFERED": "1"}
    # DeepSpeed's autotuner starts every trial with the `deepspeed` command: a wheel installed
    # with --target has no console script, so a shim on PATH runs its launcher module
    shim = work / "bin"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "deepspeed").write_text(
        f'#!/bin/sh\nexec {sys.executable} -m deepspeed.launcher.runner "$@"\n'
    )
    (shim / "deepspeed").chmod(0o755)
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
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
    if args.peers_dir:
        out += ["--peers-dir", args.peers_dir]
    return out


def _ours(
    model: str, args: argparse.Namespace, work: Path, grid: bool, env: dict[str, str]
) -> dict[str, Any]:
    """One session of our autotuner (tuner or exhaustive grid); its summary and wall time."""
    name = "grid" if grid else "tuner"
    d = work / model / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    auto: dict[str, Any] = {
        "enabled": True, "overwrite": True, "results_dir": str(d / "results"), "exps_dir": str(d / "exps"),
        "start_profile_step": args.start_step, "end_profile_step": args.end_step,
        "zero_stages": args.stages, "offload": args.offload, "micro_batch_sizes": args.micro_batches,
        "trial_timeout_s": args.trial_timeout,
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
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=d, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    (d / "session.log").write_text(done.stdout + done.stderr)
    summary_path = d / "results" / "summary.json"
    if not summary_path.exists():
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}", "wall_s": wall}
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = wall
    return summary


def _deepspeed(
    model: str, args: argparse.Namespace, work: Path, env: dict[str, str]
) -> dict[str, Any]:
    """DeepSpeed 0.19.8's autotuner on ZeRO stages x micro-batch sizes; its pick and time."""
    d = work / model / "deepspeed"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cfg_data = _base_config(args)
    cfg_data["zero_optimization"] = {"stage": [s for s in args.stages]}
    cfg_data["train_micro_batch_size_per_gpu"] = list(args.micro_batches)
    cfg_data["autotuning"] = {
        "enabled": True, "fast": True, "overwrite": True,
        "results_dir": str(d / "results"), "exps_dir": str(d / "exps"),
        "start_profile_step": args.start_step, "end_profile_step": args.end_step,
        "max_train_batch_size": args.global_batch, "tuner_early_stopping": args.early_stopping,
    }  # fmt: skip
    cfg = d / "ds_config.json"
    cfg.write_text(json.dumps(cfg_data, indent=2))
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--autotuning", "tune", "--num_gpus", "1",
            *_script_args(model, args, cfg, "deepspeed")]  # fmt: skip
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, cwd=d, capture_output=True, text=True, check=False,
                              timeout=args.deepspeed_timeout)  # fmt: skip
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"timed out after {args.deepspeed_timeout} s: {exc.stdout!r}", 124
    wall = time.perf_counter() - t0
    (d / "session.log").write_text(out)
    optimal = d / "results" / "ds_config_optimal.json"
    if not optimal.exists():
        return {"error": f"exit {rc}; no ds_config_optimal.json: {out[-1500:]}", "wall_s": wall}
    pick = json.loads(optimal.read_text())
    stage = int((pick.get("zero_optimization") or {}).get("stage", 0))
    mbs = int(pick.get("train_micro_batch_size_per_gpu", 1))
    gas = int(pick.get("gradient_accumulation_steps", 1))
    # DeepSpeed's own measurement of its pick (its units: latency in ms per step; throughput =
    # train_batch_size * 1e6 / latency, i.e. 1000x samples/s), kept raw next to ours
    reported = None
    for metrics in (d / "results").glob("*/metrics.json"):
        exp_cfg = metrics.parent / "ds_config.json"
        if not exp_cfg.exists():
            continue
        c = json.loads(exp_cfg.read_text())
        if (int((c.get("zero_optimization") or {}).get("stage", 0)), int(c.get("train_micro_batch_size_per_gpu", 0)),
                int(c.get("gradient_accumulation_steps", 1))) == (stage, mbs, gas):  # fmt: skip
            reported = json.loads(metrics.read_text())
    return {"wall_s": wall, "stage": stage, "micro_batch": mbs, "grad_accum": gas, "config": pick,
            "deepspeed_reported": reported}  # fmt: skip


def _grid_value(grid: dict[str, Any], **want: Any) -> float | None:
    for t in grid.get("trials", []):
        if all(t.get(k) == v for k, v in want.items()) and t.get("value") is not None:
            return float(t["value"])
    return None


def main() -> None:
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
    ap.add_argument("--trial-timeout", type=float, default=600)
    ap.add_argument("--deepspeed-timeout", type=float, default=1800)
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument("--peers-dir")
    ap.add_argument("--work", default="/tmp/autotune_bench")
    args = ap.parse_args()
    args.stages = [int(s) for s in args.stages.split(",")]
    args.offload = args.offload.split(",")
    args.micro_batches = [int(m) for m in args.micro_batches.split(",")]
    work = Path(args.work)
    env = _env(work)

    import torch

    device = f"1 x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    runs: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    detail: dict[str, Any] = {}
    for model in args.models.split(","):
        tuner = _ours(model, args, work, grid=False, env=env)
        grid = _ours(model, args, work, grid=True, env=env)
        ds = (
            {"skipped": "--skip-deepspeed"}
            if args.skip_deepspeed
            else _deepspeed(model, args, work, env)
        )
        detail[model] = {"tuner": tuner, "grid": grid, "deepspeed": ds}
        grid_best = grid.get("best_value")
        tuner_pick = grid_value = None
        if tuner.get("best"):
            b = tuner["best"]
            tuner_pick = tuner.get("best_value")
            grid_value = _grid_value(grid, **b)  # the same config as the grid measured it
        runs.append({"system": f"ds-profile-tuner-{model}", "time_to_answer_s": round(tuner["wall_s"], 1),
                     "best_samples_per_s": tuner_pick, "pick_in_grid_samples_per_s": grid_value,
                     "trials": len([t for t in tuner.get("trials", []) if t.get("value") is not None]),
                     "pick": tuner.get("best"), "peak_mem_gb": None, **({"error": tuner["error"]} if "error" in tuner else {})})  # fmt: skip
        runs.append({"system": f"exhaustive-grid-{model}", "time_to_answer_s": round(grid["wall_s"], 1),
                     "best_samples_per_s": grid_best, "pick": grid.get("best"),
                     "trials": len([t for t in grid.get("trials", []) if t.get("value") is not None]),
                     "peak_mem_gb": None, **({"error": grid["error"]} if "error" in grid else {})})  # fmt: skip
        ds_run: dict[str, Any] = {
            "system": f"deepspeed-0.19.8-autotuner-{model}",
            "peak_mem_gb": None,
        }
        if "wall_s" in ds and "stage" in ds:
            ds_run.update(time_to_answer_s=round(ds["wall_s"], 1),
                          pick={"stage": ds["stage"], "micro_batch": ds["micro_batch"], "grad_accum": ds["grad_accum"]},
                          deepspeed_reported=ds.get("deepspeed_reported"),
                          best_samples_per_s=_grid_value(grid, stage=ds["stage"], offload="none",
                                                         micro_batch=ds["micro_batch"], checkpointing=False))  # fmt: skip
        else:
            ds_run.update({k: v for k, v in ds.items() if k in ("error", "skipped")})
            if "wall_s" in ds:
                ds_run["time_to_answer_s"] = round(ds["wall_s"], 1)
        runs.append(ds_run)
        if grid_best and (grid_value or tuner_pick):
            ratios[f"{model} tuner pick / grid best samples_per_s"] = round(
                (grid_value or tuner_pick) / grid_best, 3
            )
        if tuner.get("wall_s") and grid.get("wall_s"):
            ratios[f"{model} tuner / grid time_to_answer_s"] = round(
                tuner["wall_s"] / grid["wall_s"], 3
            )
        if ds_run.get("best_samples_per_s") and grid_best:
            ratios[f"{model} deepspeed pick / grid best samples_per_s"] = round(
                ds_run["best_samples_per_s"] / grid_best, 3
            )
        if ds_run.get("time_to_answer_s") and tuner.get("wall_s"):
            ratios[f"{model} deepspeed / tuner time_to_answer_s"] = round(
                ds_run["time_to_answer_s"] / tuner["wall_s"], 3
            )
    path = write_results(
        scenario="autotune", device=device, runs=runs, ratios=ratios,
        metric=["time_to_answer_s", "best_samples_per_s"],
        config={k: v for k, v in vars(args).items() if k != "work"}, detail=detail,
    )  # fmt: skip
    print(json.dumps({"results": str(path), "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
