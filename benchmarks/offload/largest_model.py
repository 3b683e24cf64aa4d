"""The largest GPT one GPU trains with ZeRO-3 + offload: ours (ds_all) vs DeepSpeed, same host.

    python benchmarks/offload/largest_model.py \
        --run deepspeed:cpu=28,30,32 --run ours:cpu=36,38 --run ours:split=48,52

Each ``--run ENGINE:CONFIG=L1,L2,...`` tries those block counts in order until the first
failure. Configs (DeepSpeed JSON, the same file for both engines where both accept it): ZeRO
stage 3, bf16, AdamW, clipping 1.0, pinned memory, and

* ``cpu``: offload_optimizer and offload_param on the CPU (ZeRO-Offload);
* ``infinity``: both on NVMe at ``--nvme-path`` (ZeRO-Infinity);
* ``param-nvme``: parameters on NVMe, optimizer state on the CPU;
* ``split`` (ours only: ds_offload's ``max_in_cpu`` extension of offload_optimizer): parameter
  shards in host memory, optimizer state in host memory up to ``--max-in-cpu`` elements and on
  NVMe beyond (default, per size: what MemAvailable holds at 12 bytes an element after the bf16
  shards' 2 bytes a parameter and ``--host-reserve-gb``).

The model is the peers' tinygpt GPT with d=``--dim`` (4096: 201M
parameters per block) and a varying number of blocks; vocab 32768, sequence 1024, micro-batch
``--batch``. Each size is one subprocess (a host out-of-memory kill or a CUDA OOM ends only that
trial) that builds the model (ours: on the GPU in fp32, handed to ``ds_all.initialize``;
DeepSpeed: under ``deepspeed.zero.Init(remote_device="cpu", pin_memory=True)``, its documented
path for models that do not fit), trains ``--steps`` steps and reports the time of the last
ones, TFLOP/s (6 * params * tokens / time), peak GPU memory and peak host RSS.

Sizes are tried in the given order per engine until the first failure. The JSON
(benchmarks/results/largest-offload-<device>-<yyyymmdd>.json, and $OUT) is rewritten after every
trial, so a run cut short by a time limit keeps what it measured; ``--deadline-s`` stops starting
trials that would not finish in time. Ladders split over several commands (a GPU lease runs
at most 10 minutes per command) are combined afterwards, with the summary recomputed and a PNG
chart of TFLOP/s against size:

    python benchmarks/offload/largest_model.py --merge a.json b.json --device-name 1xNVIDIA-H200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _paths import ROOT, peers_dir, pythonpath  # next to this file

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

T, V = 1024, 32768


CONFIGS = ("cpu", "infinity", "param-nvme", "split")


def gpt_params(d: int, layers: int) -> int:
    """Parameters of tinygpt's GPT: blocks (ln1, ln2, qkv, proj, fc1, fc2), embeddings, head."""
    return layers * (12 * d * d + 13 * d) + 2 * V * d + T * d + 2 * d


def default_max_in_cpu(reserve_gb: float, params: int) -> int:
    """Optimizer elements the host holds at 12 bytes each (fp32 master + two moments) besides
    the bf16 parameter shards (2 bytes a parameter)."""
    from ds_accel import CPUAccelerator  # host memory (MemAvailable), whatever the device

    free = CPUAccelerator().available_memory() - reserve_gb * 2**30 - 2 * params
    return max(0, min(params, int(free / 12)))


def ds_config(args: argparse.Namespace, config: str) -> dict:
    """The DeepSpeed config of one of CONFIGS."""

    def section(device: str, **extra: object) -> dict:
        s: dict = {"device": device, "pin_memory": True, **extra}
        if device == "nvme":
            s["nvme_path"] = args.nvme_path
        return s

    opt_dev, param_dev = {"cpu": ("cpu", "cpu"), "infinity": ("nvme", "nvme"),
                          "param-nvme": ("cpu", "nvme"), "split": ("nvme", "cpu")}[config]  # fmt: skip
    opt_extra = {}
    if config == "split":
        budget = args.max_in_cpu
        if budget < 0:
            budget = default_max_in_cpu(args.host_reserve_gb, gpt_params(args.dim, args.layers))
        opt_extra = {"max_in_cpu": budget}
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "offload_optimizer": section(opt_dev, **opt_extra),
            "offload_param": section(param_dev),
        },
        "steps_per_print": 10**9,
    }


def _host_peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(peers_dir(args.peers_dir)))
    from tinygpt import GPT, batch

    cfg = ds_config(args, args.config)
    d, L, B = args.dim, args.layers, args.batch
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    if args.worker == "ours":
        import ds_all

        if cuda:
            torch.cuda.set_device(0)
        with torch.device(args.device):
            model = GPT(vocab=V, d=d, h=d // 128, L=L, T=T)
        n = sum(p.numel() for p in model.parameters())
        engine, *_ = ds_all.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        import deepspeed

        deepspeed.init_distributed()
        with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device="cpu", pin_memory=True):
            model = GPT(vocab=V, d=d, h=d // 128, L=L, T=T)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=cfg
        )
    build_s = time.perf_counter() - t_build
    print(f"[{args.worker}] L={L}: {n / 1e9:.2f}B parameters built in {build_s:.0f} s", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for s in range(args.steps):
        sync()
        t0 = time.perf_counter()
        x, y = batch(s, 0, B, T, V, engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        print(f"[{args.worker}] L={L} step {s}: {times[-1]:.2f} s loss {loss.item():.3f}",
              flush=True)  # fmt: skip
    timed = times[2:] if len(times) > 2 else times[-1:]
    dt = sum(timed) / len(timed)
    print(json.dumps({
        "engine": args.worker, "layers": L, "params_B": round(n / 1e9, 3), "step_s": round(dt, 3),
        "offload": {k: cfg["zero_optimization"][k] for k in ("offload_optimizer", "offload_param")},
        "tflops": round(6 * n * B * T / dt / 1e12, 1), "tok_s": round(B * T / dt),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "host_peak_rss_gb": _host_peak_gb(), "build_s": round(build_s, 1),
        "loss": round(loss.item(), 3), "step_times_s": [round(t, 3) for t in times],
    }), flush=True)  # fmt: skip


def _trial(engine: str, config: str, layers: int, args: argparse.Namespace, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--config", config,
           "--layers", str(layers), "--dim", str(args.dim), "--batch", str(args.batch),
           "--steps", str(args.steps), "--nvme-path", args.nvme_path, "--device", args.device,
           "--max-in-cpu", str(args.max_in_cpu)]  # fmt: skip
    if args.peers_dir:
        cmd += ["--peers-dir", args.peers_dir]
    env = dict(os.environ, PYTHONPATH=pythonpath(), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + layers), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return {"engine": engine, "config": config, "layers": layers, "ok": False,
                "failure": "timeout",
                "timeout_s": round(timeout), "stdout_tail": (out or "")[-1500:]}  # fmt: skip
    wall = round(time.monotonic() - t0, 1)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "config": config, "ok": True, "wall_s": wall}
    err = proc.stderr[-3000:]
    if proc.returncode in (-9, 137):
        failure = "killed (host out of memory)"
    elif "out of memory" in err.lower():
        failure = "GPU out of memory"
    else:
        failure = f"exit {proc.returncode}"
    return {"engine": engine, "config": config, "layers": layers, "ok": False,
            "failure": failure, "wall_s": wall,
            "stdout_tail": proc.stdout[-1500:], "stderr_tail": err}  # fmt: skip


def _summary(trials: list[dict]) -> dict:
    """The largest success per engine:config and per engine, and the ratios ours/DeepSpeed
    (per engine: each one's best config; per config: the same config)."""
    best: dict[str, dict] = {}
    for t in trials:
        if not t.get("ok"):
            continue
        for key in (t["engine"], f"{t['engine']}:{t['config']}"):
            if t["params_B"] > best.get(key, {}).get("params_B", 0):
                best[key] = t
    out: dict = {k: {"params_B": v["params_B"], "layers": v["layers"], "config": v["config"],
                     "tflops": v["tflops"], "step_s": v["step_s"]} for k, v in best.items()}  # fmt: skip
    if "ours" in best and "deepspeed" in best:
        out["params_ratio_vs_deepspeed"] = round(
            best["ours"]["params_B"] / best["deepspeed"]["params_B"], 3
        )
    for c in CONFIGS:
        o, d = best.get(f"ours:{c}"), best.get(f"deepspeed:{c}")
        if o and d:
            out[f"params_ratio_vs_deepspeed_{c}"] = round(o["params_B"] / d["params_B"], 3)
    # Speed where both trained the same size and config: the fair side-by-side of step time.
    done = {(t["engine"], t["config"], t["layers"]): t for t in trials if t.get("ok")}
    for (engine, config, layers), o in sorted(done.items()):
        d = done.get(("deepspeed", config, layers))
        if engine == "ours" and d:
            out[f"tok_s_ratio_vs_deepspeed_{config}_L{layers}"] = round(o["tok_s"] / d["tok_s"], 3)
    return out


def _runs(trials: list[dict]) -> list[dict]:
    """The results schema's runs: per engine:config, its largest success (or why none)."""
    best: dict[str, dict] = {}
    for t in trials:
        key = f"{t['engine']}:{t['config']}"
        if t.get("ok") and t["params_B"] > best.get(key, {}).get("params_B", 0):
            best[key] = t
        best.setdefault(key, {})
    return [
        {"system": key, "step_s": t["step_s"], "tokens_per_s": t["tok_s"],
         "peak_mem_gb": t["gpu_peak_gb"], "params_B": t["params_B"], "layers": t["layers"],
         "tflops": t["tflops"], "host_peak_rss_gb": t["host_peak_rss_gb"]}
        if t else {"system": key, "error": "every size tried failed", "peak_mem_gb": None}
        for key, t in best.items()
    ]  # fmt: skip


def _report(args: argparse.Namespace, trials: list[dict], path: Path, **extra: object) -> None:
    ratios = {k: v for k, v in _summary(trials).items() if not isinstance(v, dict)}
    write_results(
        scenario="largest GPT on one GPU, ZeRO-3 + offload", device=args.device_name,
        date=time.strftime("%Y-%m-%d %H:%M:%S"), path=path, copy_to_out=False,
        configs={c: ds_config(args, c) for c in CONFIGS if c != "split"}, dim=args.dim,
        batch=args.batch, seq=T, trials=trials, **extra, runs=_runs(trials), ratios=ratios,
    )  # fmt: skip


def merge(args: argparse.Namespace) -> None:
    """One report from the JSON of several invocations (one lease, commands of at most 10
    minutes each): their trials in the given order, the summary recomputed over all of them."""
    trials: list[dict] = []
    runs: list[str] = []
    for f in args.merge:
        data = json.loads(Path(f).read_text())
        if data.get("device") != args.device_name or data.get("dim") != args.dim:
            raise SystemExit(f"--merge {f}: device {data.get('device')!r} / dim {data.get('dim')} "
                             f"differ from --device-name {args.device_name!r} / --dim {args.dim}")  # fmt: skip
        trials += data["trials"]
        runs.append(data["date"])
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"largest-offload-{args.device_name}-{time.strftime('%Y%m%d')}.json")  # fmt: skip
    _report(args, trials, path, merged_runs_dated=runs)
    _plot(trials, path.with_suffix(".png"), args.device_name, args.dim)
    print(json.dumps(_summary(trials), indent=2))


def _plot(trials: list[dict], path: Path, device: str, dim: int) -> None:
    """TFLOP/s against model size per engine:config; a cross where a size failed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted({f"{t['engine']}:{t['config']}" for t in trials}):
        rows = [t for t in trials if f"{t['engine']}:{t['config']}" == key]
        ok = sorted((t["params_B"], t["tflops"]) for t in rows if t.get("ok"))
        (line,) = ax.plot([p for p, _ in ok], [f for _, f in ok], "o-", label=key)
        for t in rows:
            if not t.get("ok"):  # no size measured: place it by its parameter count
                ax.plot(gpt_params(dim, t["layers"]) / 1e9, 0, "x", color=line.get_color(),
                        markersize=10, mew=2)  # fmt: skip
    ax.set_xlabel("parameters (billions); x: failed (host out of memory)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Largest GPT trained with ZeRO-3 offload, {device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def _parse_runs(specs: list[str]) -> list[tuple[str, str, list[int]]]:
    runs = []
    for spec in specs:
        try:
            head, ladder = spec.split("=", 1)
            engine, config = head.split(":", 1)
            layers = [int(x) for x in ladder.split(",") if x]
        except ValueError:
            raise SystemExit(f"--run {spec!r}: expected ENGINE:CONFIG=L1,L2,...") from None
        if engine not in ("ours", "deepspeed") or config not in CONFIGS or not layers:
            raise SystemExit(f"--run {spec!r}: engine ours|deepspeed, config one of {CONFIGS}")
        if engine == "deepspeed" and config == "split":
            raise SystemExit("--run deepspeed:split: DeepSpeed has no max_in_cpu for the optimizer")
        runs.append((engine, config, layers))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["ours", "deepspeed"])
    ap.add_argument("--config", choices=CONFIGS, default="cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--run", action="append", default=[],
                    help="ENGINE:CONFIG=L1,L2,... (repeatable)")  # fmt: skip
    ap.add_argument("--max-in-cpu", type=int, default=-1,
                    help="split: optimizer elements in host memory (-1: from MemAvailable)")  # fmt: skip
    ap.add_argument("--host-reserve-gb", type=float, default=24.0)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--nvme-path", default="/tmp/ds_nvme")
    ap.add_argument("--trial-timeout-s", type=float, default=420)
    ap.add_argument("--deadline-s", type=float, default=float("inf"))
    ap.add_argument("--device-name", default="1xNVIDIA-H200")
    ap.add_argument("--peers-dir", default=None)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke run of the driver (DS_ACCELERATOR=cpu for DeepSpeed)")  # fmt: skip
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the reports of several invocations into one (no trials run)")  # fmt: skip
    ap.add_argument("--out", default=None, help="--merge: the combined report's path")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.merge:
        merge(args)
        return
    runs = _parse_runs(args.run or ["deepspeed:cpu=28,30,32", "ours:cpu=36,38,40"])
    os.makedirs(args.nvme_path, exist_ok=True)
    start = time.monotonic()
    name = f"largest-offload-{args.device_name}-{time.strftime('%Y%m%d')}.json"
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    trials: list[dict] = []
    for engine, config, ladder in runs:
        for layers in ladder:
            left = args.deadline_s - (time.monotonic() - start)
            if left < 60:
                print(f"deadline: not starting {engine}:{config} L={layers}", flush=True)
                break
            trial = _trial(engine, config, layers, args, min(args.trial_timeout_s, left))
            print(json.dumps(trial), flush=True)
            trials.append(trial)
            _report(args, trials, results / name)
            if os.environ.get("OUT"):
                _report(args, trials, Path(os.environ["OUT"], name))
            if not trial.get("ok"):
                break
    print(json.dumps(_summary(trials), indent=2))


if __name__ == "__main__":
    main()
