"""The autotuning session: profile the model once, rule out what cannot fit, run the rest as
short trials in the tuner's order, write the best config, a table and a chart."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_profile.autotune._estimator import ModelFacts, fits, required_bytes
from ds_profile.autotune._png import bar_chart_png
from ds_profile.autotune._settings import AutotuneSettings
from ds_profile.autotune._space import Candidate, enumerate_space, global_batch, trial_config
from ds_profile.autotune._trials import Job, TrialStore, launch, script_overrides
from ds_profile.autotune._tuner import Outcome, better, fallbacks, order, prune, search

_METRIC_KEYS = {"throughput": "throughput", "latency": "latency", "flops": "FLOPS_per_gpu"}


class AutotuneError(RuntimeError):
    """The session cannot go on (the profile run failed, nothing fits); the message says why."""


@dataclass
class Result:
    """The session's answer and its record."""

    best: Candidate | None
    best_value: float | None
    outcomes: list[Outcome]
    rejected: list[Candidate]
    launched: int
    seconds: float
    optimal_config_path: Path | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    #: the session stopped at ``session_timeout_s`` with candidates left to run
    timed_out: bool = False


def _time_left(settings: AutotuneSettings, deadline: float | None) -> float:
    """A launch's time limit: the trial limit, cut to what is left of the session's."""
    if deadline is None:
        return settings.trial_timeout_s
    return min(settings.trial_timeout_s, deadline - time.perf_counter())


def _read_config(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AutotuneError(f"autotuning: config file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise AutotuneError(f"autotuning: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AutotuneError(f"autotuning: {path} must hold a JSON object")
    return data


def _half(cfg: dict[str, Any]) -> bool:
    return any(bool((cfg.get(k) or {}).get("enabled")) for k in ("fp16", "bf16", "bfloat16"))


def _profile_run(job: Job, user_cfg: dict[str, Any], settings: AutotuneSettings, world: int,
                 exps_dir: Path, checkpointing: bool, deadline: float | None) -> dict[str, Any]:  # fmt: skip
    """One launch at micro-batch 1 with the model-info profile on: after one forward the engine
    writes the parameter count, the activation bytes of one sample and the device memory, then
    exits. It runs in the space's leanest configuration (highest stage, most offload), so a
    model that fits only with offload can still be profiled."""
    name = "profile_ac" if checkpointing else "profile"
    stage = max(settings.zero_stages)
    offload = "none"
    for kind in ("optimizer+param", "optimizer") if stage > 0 else ():
        if kind in settings.offload and (kind != "optimizer+param" or stage == 3):
            offload = kind
            break
    cand = Candidate(stage, offload, 1, 1, checkpointing)
    info_path = (exps_dir / name / "model_info.json").resolve()
    cfg = trial_config(user_cfg, cand, world, settings, str(exps_dir / name / "metric.json"))
    cfg["autotuning"] = {
        "enabled": True,
        "model_info": {"profile": True},
        "model_info_path": str(info_path),
    }
    overrides = script_overrides(cand, settings)
    limit = _time_left(settings, deadline)
    if limit <= 0:
        raise AutotuneError(
            "autotuning: the session time limit (autotuning.session_timeout_s) ran out before "
            "the model-info profile run"
        )
    rc, _ = launch(job, cfg, exps_dir / name, overrides, limit)
    if not info_path.exists():
        raise AutotuneError(
            f"autotuning: the model-info profile run exited with {rc} and wrote no {info_path}; "
            f"see {exps_dir / name}/stderr.log"
        )
    return json.loads(info_path.read_text())


def model_facts(job: Job, user_cfg: dict[str, Any], settings: AutotuneSettings, world: int,
                results_dir: Path, exps_dir: Path, deadline: float | None = None) -> ModelFacts:  # fmt: skip
    cached = results_dir / "model_info.json"
    if cached.exists():
        info = json.loads(cached.read_text())
    else:
        info = _profile_run(job, user_cfg, settings, world, exps_dir, False, deadline)
        if settings.activation_checkpointing_arg:
            ac = _profile_run(job, user_cfg, settings, world, exps_dir, True, deadline)
            info["checkpointed_activation_mem_per_gpu"] = ac["activation_mem_per_gpu"]
        cached.write_text(json.dumps(info, indent=2))
    budget = info.get("device_memory_bytes", 0)
    return ModelFacts(
        num_params=int(info["num_params"]),
        activation_bytes_per_sample=int(info["activation_mem_per_gpu"]),
        checkpointed_activation_bytes_per_sample=info.get("checkpointed_activation_mem_per_gpu"),
        half_precision=_half(user_cfg),
        device_memory_bytes=int(budget),
    )


def _value(metric_file: Path, metric: str) -> float | None:
    if not metric_file.exists():
        return None
    data = json.loads(metric_file.read_text())
    v = data.get(_METRIC_KEYS[metric])
    return float(v) if isinstance(v, (int, float)) else None


def tune(job: Job, world: int, settings_override: dict[str, Any] | None = None) -> Result:
    """Run an autotuning session for ``job`` on ``world`` ranks (see the module docstring)."""
    start = time.perf_counter()
    user_cfg = _read_config(job.config_path())
    raw = dict(user_cfg.get("autotuning") or {})
    raw.update(settings_override or {})
    settings = AutotuneSettings.from_config(raw)
    user_cfg = {k: v for k, v in user_cfg.items() if k != "autotuning"}
    results_dir, exps_dir = Path(settings.results_dir), Path(settings.exps_dir)
    if settings.overwrite:  # DeepSpeed's meaning: start over; false resumes finished trials
        shutil.rmtree(results_dir, ignore_errors=True)
        shutil.rmtree(exps_dir, ignore_errors=True)
    store = TrialStore(results_dir, exps_dir)
    deadline = (
        start + settings.session_timeout_s if settings.session_timeout_s is not None else None
    )
    facts = model_facts(job, user_cfg, settings, world, results_dir, exps_dir, deadline)
    budget = (
        int(settings.memory_per_device_gb * 2**30)
        if settings.memory_per_device_gb
        else facts.device_memory_bytes
    )
    if budget <= 0:
        raise AutotuneError(
            "autotuning: device memory unknown; set autotuning.memory_per_device_gb"
        )

    batch = global_batch(user_cfg, settings, world)
    space = enumerate_space(settings, batch, world)
    feasible = [c for c in space if fits(c, facts, world, budget)]
    rejected = [c for c in space if c not in feasible]
    if not feasible:
        need = min(required_bytes(c, facts, world) for c in space) / 2**30
        raise AutotuneError(
            f"autotuning: no configuration fits {budget / 2**30:.1f} GiB per device (the smallest "
            f"needs {need:.1f} GiB); allow offload or more ranks, or raise memory_per_device_gb"
        )

    def bytes_of(c: Candidate) -> int:
        return required_bytes(c, facts, world)

    pruning = settings.fast or settings.tuner_type == "model_based"
    pool = prune(feasible, world, bytes_of) if pruning else feasible
    backup = fallbacks(feasible, pool, world, bytes_of) if pruning else {}
    ordered = order(pool, settings, world)
    launched = 0
    cut_short: set[Candidate] = set()  # stopped by the session's time limit, not finished

    def out_of_time() -> bool:
        return _time_left(settings, deadline) <= 0

    def run(cand: Candidate) -> float | None:
        nonlocal launched
        done = store.finished(cand.name)
        if done is not None and done.get("status") in ("ok", "failed"):
            return done.get("value")
        exp = exps_dir / cand.name
        metric_file = (exp / "metric.json").resolve()
        metric_file.unlink(missing_ok=True)
        cfg = trial_config(user_cfg, cand, world, settings, str(metric_file))
        store.log_launch({"name": cand.name, "candidate": cand.as_dict(), "estimate_bytes": bytes_of(cand),
                          "budget_bytes": budget})  # fmt: skip
        launched += 1
        limit = _time_left(settings, deadline)
        rc, secs = launch(job, cfg, exp, script_overrides(cand, settings), limit)
        value = _value(metric_file, settings.metric)
        metrics = json.loads(metric_file.read_text()) if metric_file.exists() else {}
        status = "ok" if value is not None else "failed"
        if value is None and rc == 124 and limit < settings.trial_timeout_s:
            # stopped by the session's limit, not its own: not finished, so a resumed
            # session runs it again
            status = "timeout"
            cut_short.add(cand)
        store.record(cand.name, {
            "name": cand.name, "candidate": cand.as_dict(), "status": status,
            "value": value, "metrics": metrics, "exit_code": rc, "seconds": secs,
            "estimate_bytes": bytes_of(cand), "budget_bytes": budget,
        })  # fmt: skip
        return value

    outcomes = search(ordered, settings, run, stop=out_of_time, fallback_of=backup)
    ran = {o.candidate for o in outcomes}
    timed_out = bool(cut_short) or (out_of_time() and any(c not in ran for c in ordered))
    ok = [o for o in outcomes if o.value is not None]
    best = None
    for o in ok:
        if best is None or better(o.value, best.value, settings.metric):  # type: ignore[arg-type]
            best = o
    optimal = None
    if best is not None:
        cfg = trial_config(user_cfg, best.candidate, world, settings, "")
        cfg.pop("autotuning")
        optimal = results_dir / "ds_config_optimal.json"
        optimal.write_text(json.dumps(cfg, indent=2))
        overrides = script_overrides(best.candidate, settings)
        (results_dir / "cmd_optimal.json").write_text(json.dumps(job.argv(str(optimal), overrides)))
    result = Result(best.candidate if best else None, best.value if best else None, outcomes, rejected,
                    launched, time.perf_counter() - start, optimal, timed_out=timed_out)  # fmt: skip
    _write_report(result, settings, store, results_dir, space, bytes_of, budget, cut_short)
    return result


def _write_report(result: Result, settings: AutotuneSettings, store: TrialStore, results_dir: Path,
                  space: list[Candidate], bytes_of: Any, budget: int,
                  cut_short: set[Candidate]) -> None:  # fmt: skip
    ran = {o.candidate: o.value for o in result.outcomes}
    rows: list[dict[str, Any]] = []
    for c in space:
        if c in cut_short:
            status = "timeout"
        elif c in ran:
            status = "failed" if ran[c] is None else ("best" if c == result.best else "ok")
        elif c in result.rejected:
            status = "rejected"
        else:
            status = "skipped"
        rows.append({"name": c.name, **c.as_dict(), "status": status, "value": ran.get(c),
                     "estimate_gib": round(bytes_of(c) / 2**30, 3)})  # fmt: skip
    result.trials = rows
    unit = {"throughput": "samples/s", "latency": "s/step", "flops": "FLOP/s"}[settings.metric]
    lines = [f"{'config':<34} {'stage':>5} {'offload':>16} {'mbs':>5} {'gas':>5} {'ac':>3} "
             f"{'est GiB':>8} {'status':>9} {settings.metric + ' (' + unit + ')':>24}"]  # fmt: skip
    for r in rows:
        v = "" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"{r['name']:<34} {r['stage']:>5} {r['offload']:>16} {r['micro_batch']:>5} "
                     f"{r['grad_accum']:>5} {'y' if r['checkpointing'] else 'n':>3} {r['estimate_gib']:>8} "
                     f"{r['status']:>9} {v:>24}")  # fmt: skip
    summary = (f"autotuning: {len(result.outcomes)} trials ({result.launched} launched now), "
               f"{len(result.rejected)} ruled out by the memory estimator (budget {budget / 2**30:.3g} GiB), "
               f"{result.seconds:.1f} s; best: {result.best.name if result.best else 'none'}"
               + ("; stopped at the session time limit (autotuning.session_timeout_s)" if result.timed_out else ""))  # fmt: skip
    text = "\n".join(lines + [summary])
    (results_dir / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    (results_dir / "summary.json").write_text(json.dumps({
        "best": result.best.as_dict() if result.best else None, "best_value": result.best_value,
        "metric": settings.metric, "seconds": result.seconds, "launched": result.launched,
        "timed_out": result.timed_out, "trials": rows,
    }, indent=2))  # fmt: skip
    values = [r["value"] for r in rows if r["value"] is not None]
    top = max(values) if values else 1.0
    if settings.metric == "latency" and values:
        low = min(values)
        bars = [(r["status"] if r["status"] != "skipped" else "rejected",
                 (low / r["value"]) if r["value"] else 0.0) for r in rows if r["status"] != "skipped"]  # fmt: skip
    else:
        bars = [
            (r["status"], (r["value"] / top) if r["value"] else 0.0)
            for r in rows
            if r["status"] != "skipped"
        ]
    (results_dir / "trials.png").write_bytes(bar_chart_png(bars))


def run_best(job: Job, result: Result, settings_override: dict[str, Any] | None = None) -> int:
    """``--autotuning run``: start the job with the best configuration found."""
    if result.optimal_config_path is None or result.best is None:
        raise AutotuneError("autotuning: no trial succeeded; nothing to run")
    raw = dict(_read_config(job.config_path()).get("autotuning") or {})
    raw.update(settings_override or {})
    settings = AutotuneSettings.from_config(raw)
    argv = job.argv(str(result.optimal_config_path), script_overrides(result.best, settings))
    return subprocess.run(argv, check=False).returncode
