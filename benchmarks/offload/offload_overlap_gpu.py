"""Offload near the hardware limit, one GPU: the overlapped exact step, the one-step-delayed update
and twin-flow partial offload (ds_all) against DeepSpeed 0.19.8's ZeRO-Offload, twin-flow
(``ratio``), SuperOffload and ZenFlow, same config file, same GPU, one session.

    python benchmarks/offload/offload_overlap_gpu.py --scenarios zero3 zero2 \\
        --peers-dir shared/peers --device-name 1xNVIDIA-H100

Model: shared/peers' tinygpt GPT, d=2048, 24 layers, vocab 32768, seq 1024 (1.34B parameters),
micro-batch 8, bf16, AdamW lr 1e-4, clip 1.0. Each system runs in its own subprocess (one GPU)
under a time limit, ``--warmup`` + ``--steps`` steps, the same training loop for both engines
(``engine(x, y); engine.backward(loss); engine.step()``), the only difference being which
package ``initialize`` comes from. A system that fails or runs out of time is recorded with its
error (and the limit). Scenarios write ``benchmarks/results/offload-overlap-zero{3,2}-<device>-
<yyyymmdd>.json`` (and ``$OUT``), plus one PNG chart of both.

For ds_all's offloaded runs the worker also measures, per timed step: the GPU stream time of
forward+backward (CUDA events on the compute stream; it includes the stream's waits for updated
partitions) and the gap before the next forward; the CPU Adam time on the worker thread; the
host's time blocked waiting for partitions; bytes copied each way and their rate (CUDA events
around each copy on the copy streams). The run of ``ours-resident`` gives the GPU compute time
alone; the ``bound`` names the largest of GPU compute, CPU Adam and transfer time.

``--chart RESULTS.json...`` redraws the chart from result files (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from _paths import ROOT, peers_dir, pythonpath  # next to this file

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

# system -> (engine, zero_optimization for the scenario's stage S)
OFFLOAD = {"device": "cpu", "pin_memory": True}


def _effective(spec: tuple[str, dict], stage: int) -> tuple[str, dict]:
    """The configuration an engine actually runs: DeepSpeed 0.19.8's stage-1/2 optimizer never
    reads ``offload_optimizer.ratio`` (only its stage-3 optimizer does), so below stage 3 its
    ratio run is its full-offload run and is measured once."""
    engine, zero = spec
    off = zero.get("offload_optimizer")
    if engine == "deepspeed" and stage < 3 and off and "ratio" in off:
        zero = {**zero, "offload_optimizer": {k: v for k, v in off.items() if k != "ratio"}}
    return engine, zero


def _systems(stage: int) -> dict[str, tuple[str, dict]]:
    z = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    out = {
        "ours-resident": ("ours", {"stage": 1}),
        "ours-offload-exact": ("ours", {**z, "offload_optimizer": dict(OFFLOAD)}),
        "ours-offload-delayed": (
            "ours",
            {**z, "offload_optimizer": {**OFFLOAD, "delayed_update": True}},
        ),
        "ours-offload-ratio-0.5": ("ours", {**z, "offload_optimizer": {**OFFLOAD, "ratio": 0.5}}),
        "deepspeed-offload": ("deepspeed", {**z, "offload_optimizer": dict(OFFLOAD)}),
        "deepspeed-offload-ratio-0.5": (
            "deepspeed",
            {**z, "offload_optimizer": {**OFFLOAD, "ratio": 0.5}},
        ),
    }
    if stage == 3:  # SuperOffload is a stage-3 optimizer in DeepSpeed 0.19.8
        out["deepspeed-superoffload"] = (
            "deepspeed",
            {**z, "offload_optimizer": {**OFFLOAD, "super_offload": True}},
        )
    else:  # ZenFlow's stage-1/2 optimizer, with the settings of its tutorial
        out["deepspeed-zenflow"] = (
            "deepspeed",
            {
                **z,
                "offload_optimizer": dict(OFFLOAD),
                "zenflow": {"topk_ratio": 0.05, "update_interval": 4, "overlap_step": True},
            },
        )
    # last (a session deadline skips it before the peers): the exact step with the gradients
    # handed to the host in fp32 (ds-zero 0.1.4's path), to measure what bf16 saves
    out["ours-offload-exact-fp32-grads"] = (
        "ours",
        {**z, "offload_optimizer": {**OFFLOAD, "exact_16bit_grads": False}},
    )
    return out


def _config(zero: dict, batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }


# ------------------------------------------------------------------ worker (one system)
class Probe:
    """Per-step breakdown of ds_all's offloaded step (see the module docstring)."""

    def __init__(self, stepper) -> None:
        import torch

        self.torch = torch
        self.adam_s = 0.0
        self.wait_s = 0.0
        self.copier = stepper._copier
        self.copier.log = []
        adam, wait, finish = stepper._cpu_adam, stepper.wait_partition, stepper._finish_job

        def timed_adam(*a, **k):
            t = time.perf_counter()
            try:
                return adam(*a, **k)
            finally:
                self.adam_s += time.perf_counter() - t

        def timed(fn):
            def inner(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.wait_s += time.perf_counter() - t

            return inner

        stepper._cpu_adam = timed_adam
        stepper.wait_partition = timed(wait)
        stepper._finish_job = timed(finish)

    def reset(self) -> None:
        self.adam_s = self.wait_s = 0.0
        self.copier.log = []

    def transfers(self) -> dict:
        out = {}
        for kind in ("d2h", "h2d"):
            rows = [r for r in self.copier.log if r[0] == kind]
            nbytes = sum(r[1] for r in rows)
            secs = sum(r[2].elapsed_time(r[3]) for r in rows) / 1e3
            out[f"{kind}_gb"] = round(nbytes / 1e9, 3)
            out[f"{kind}_copy_s"] = round(secs, 4)
            out[f"{kind}_gbps"] = round(nbytes / 1e9 / secs, 1) if secs > 0 else None
        return out


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(peers_dir(args.peers_dir)))
    from tinygpt import GPT, batch

    engine_name, zero = json.loads(args.spec)
    torch.cuda.set_device(0)
    if engine_name == "deepspeed":
        import deepspeed as lib
    else:
        import ds_all as lib
    torch.manual_seed(0)
    T, V, d, L, B = 1024, 32768, args.d, args.layers, args.batch
    model = GPT(vocab=V, d=d, h=d // 128, L=L, T=T)
    n = sum(p.numel() for p in model.parameters())
    cfg = _config(zero, B)
    engine, *_ = lib.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    stepper = getattr(getattr(engine, "zero", None), "stepper", None)
    probe = Probe(stepper) if stepper is not None and hasattr(stepper, "_copier") else None
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    marks: list[tuple] = []
    torch.cuda.reset_peak_memory_stats()
    steps = args.warmup + args.steps
    for s in range(steps):
        if s == args.warmup:
            torch.cuda.synchronize()
            if probe is not None:
                probe.reset()
            t0 = time.perf_counter()
        x, y = batch(s, 0, B, T, V, "cuda")
        e0, e1 = ev(), ev()
        e0.record()
        loss = engine(x, y)
        engine.backward(loss)
        e1.record()
        engine.step()
        if s >= args.warmup:
            marks.append((e0, e1))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    if probe is not None:
        # with delayed_update the last step's CPU job may still be queueing copies (and timing
        # events) from its worker thread: let it finish before the events are read
        stepper.synchronize()
        torch.cuda.synchronize()
    fwd_bwd = sum(a.elapsed_time(b) for a, b in marks) / len(marks) / 1e3
    gaps = [marks[i][1].elapsed_time(marks[i + 1][0]) / 1e3 for i in range(len(marks) - 1)]
    out = {
        "params_M": round(n / 1e6, 1),
        "step_s": round(dt, 4),
        "tokens_per_s": round(B * T / dt),
        "tflops": round(6 * n * B * T / dt / 1e12, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(loss.item(), 4),
        "gpu_fwd_bwd_s": round(fwd_bwd, 4),  # compute-stream time, waits for partitions included
        "gpu_gap_s": round(sum(gaps) / len(gaps), 4) if gaps else None,  # stream idle between
    }
    if probe is not None:
        out.update(
            cpu_adam_s=round(probe.adam_s / args.steps, 4),
            host_wait_s=round(probe.wait_s / args.steps, 4),
            cpu_adam_threads=stepper.num_threads,
            offload_ratio=stepper.ratio,
            **{k: v for k, v in probe.transfers().items()},
        )
        for k in ("d2h_gb", "h2d_gb", "d2h_copy_s", "h2d_copy_s"):
            out[k] = round(out[k] / args.steps, 4)
        handed = getattr(engine.zero, "grad_handover_dtypes", [])
        out["grad_dtype"] = ",".join(sorted({str(d).removeprefix("torch.") for d in handed}))
        out["host_grad_buffers_gb"] = round(stepper.host_memory()["gradient_buffers"] / 1e9, 3)
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(engine_name: str) -> dict[str, str]:
    path = pythonpath()  # the DeepSpeed runs find the real DeepSpeed, never ds-deepspeed's alias
    return dict(
        os.environ,
        PYTHONPATH=path,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
    )


def _run_system(name: str, spec: tuple[str, dict], args, limit_s: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--spec", json.dumps(spec)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--dim", str(args.d), "--layers", str(args.layers)]
    if args.peers_dir:
        cmd += ["--peers-dir", args.peers_dir]
    print(f"+ {name} (limit {limit_s:.0f} s)", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=_env(spec[0]), capture_output=True, text=True, timeout=limit_s
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"system": name, "error": f"no result within the {limit_s:.0f} s limit (killed)",
                "time_limit_s": round(limit_s), "stderr_tail": tail, "peak_mem_gb": None}  # fmt: skip
    wall = round(time.perf_counter() - t, 1)
    sys.stderr.write(proc.stderr[-3000:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {"system": name, **json.loads(line[7:]), "wall_s": wall}
    err = next(
        (ln for ln in reversed(proc.stderr.splitlines()) if "Error" in ln or "error" in ln),
        f"exit {proc.returncode}",
    )
    return {"system": name, "error": err[-500:], "exit": proc.returncode, "time_limit_s":
            round(limit_s), "stderr_tail": proc.stderr[-1500:], "peak_mem_gb": None}  # fmt: skip


def _bound(run: dict, resident: dict | None) -> None:
    """Name what bounds an offloaded step of ours: GPU compute, CPU Adam or the transfers."""
    if "cpu_adam_s" not in run:
        return
    compute = resident.get("gpu_fwd_bwd_s") if resident else None
    parts = {
        "cpu-adam": run["cpu_adam_s"],
        "pcie": max(run.get("d2h_copy_s") or 0, run.get("h2d_copy_s") or 0),
    }
    if compute:
        parts["gpu-compute"] = compute
    run["bound"] = max(parts, key=parts.get)
    run["overlap_s"] = round(sum(parts.values()) - run["step_s"], 4)  # >0: parts ran together


def _ratios(runs: list[dict]) -> dict:
    by = {r["system"]: r for r in runs if "step_s" in r}
    out = {}

    def ratio(key, a, b):
        if a in by and b in by:
            out[key] = round(by[b]["step_s"] / by[a]["step_s"], 3)

    ratio("ours-offload-exact/deepspeed-offload speed", "ours-offload-exact", "deepspeed-offload")
    ratio("ours-offload-ratio-0.5/deepspeed-offload-ratio-0.5 speed", "ours-offload-ratio-0.5",
          "deepspeed-offload-ratio-0.5")  # fmt: skip
    ratio("ours-offload-exact/ours-offload-exact-fp32-grads speed", "ours-offload-exact",
          "ours-offload-exact-fp32-grads")  # fmt: skip
    for name in ("ours-offload-exact", "ours-offload-delayed", "ours-offload-ratio-0.5"):
        if name in by and "ours-resident" in by:
            out[f"{name} step / ours-resident step"] = round(
                by[name]["step_s"] / by["ours-resident"]["step_s"], 3
            )
    return out


def _chart(paths: list[Path], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", flush=True)
        return
    data = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(data), figsize=(7 * len(data), 4.8), squeeze=False)
    for ax, d in zip(axes[0], data):
        runs = d["runs"]
        names = [r["system"] for r in runs]
        vals = [r.get("step_s") or 0 for r in runs]
        colors = ["tab:blue" if n.startswith("ours") else "tab:orange" for n in names]
        ax.barh(names, vals, color=colors)
        for i, r in enumerate(runs):
            label = f"{r['step_s']:.3f} s, {r['peak_mem_gb']} GB" if "step_s" in r else "failed"
            ax.text(vals[i], i, " " + label, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per step (lower is better)")
        ax.set_title(f"{d['scenario']} ({d['device']})", fontsize=10)
        ax.set_xlim(0, max(vals + [0.1]) * 1.45)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"chart: {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--spec", default="")
    ap.add_argument("--scenarios", nargs="+", default=["zero3", "zero2"],
                    choices=["zero3", "zero2"])  # fmt: skip
    ap.add_argument("--systems", nargs="*", default=None, help="a subset of the systems")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dim", "--d", dest="d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit-s", type=float, default=110, help="time limit of one system")
    ap.add_argument("--peer-mode-limit-s", type=float, default=75,
                    help="time limit of SuperOffload / ZenFlow (known to stall in 0.19.8)")  # fmt: skip
    ap.add_argument("--deadline-s", type=float, default=470, help="for the whole invocation")
    ap.add_argument("--peers-dir", default=None)
    ap.add_argument("--device-name", default="1xGPU")
    ap.add_argument("--chart", nargs="*", default=None, help="redraw the chart from these files")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    day = time.strftime("%Y%m%d")
    out_dir = ROOT / "benchmarks" / "results"
    if args.chart:
        paths = [Path(p) for p in args.chart]
        _chart(paths, out_dir / f"offload-overlap-{args.device_name}-{day}.png")
        return
    start = time.perf_counter()
    written = []
    done: dict[str, dict] = {}  # the same engine and config in both scenarios: run once
    for scenario in args.scenarios:
        stage = int(scenario[-1])
        runs = []
        for name, spec in _systems(stage).items():
            if args.systems and name not in args.systems:
                continue
            limit = args.limit_s
            if name in ("deepspeed-superoffload", "deepspeed-zenflow"):
                limit = args.peer_mode_limit_s
            key = json.dumps(_effective(spec, stage), sort_keys=True)
            if key in done:
                same = done[key]["system"]
                why = ("the other scenario's (same config)" if same == name else
                       f"{same}'s: DeepSpeed 0.19.8 reads offload_optimizer.ratio at stage 3 "
                       "only, so below it this is the same configuration")  # fmt: skip
                runs.append({**done[key], "system": name, "same_run_as": why})
                continue
            left = args.deadline_s - (time.perf_counter() - start)
            if left < 30:
                runs.append({"system": name, "skipped": "session deadline reached",
                             "peak_mem_gb": None})  # fmt: skip
                continue
            runs.append(_run_system(name, spec, args, min(limit, left)))
            done[key] = runs[-1]
            print(json.dumps(runs[-1])[:600], flush=True)
        resident = next((r for r in runs if r["system"] == "ours-resident" and "step_s" in r), None)
        for r in runs:
            _bound(r, resident)
        notes = {
            "config": {"model": f"tinygpt d={args.d} L={args.layers} vocab 32768 seq 1024",
                       "micro_batch": args.batch, "dtype": "bf16", "optimizer": "AdamW lr 1e-4",
                       "gradient_clipping": 1.0, "warmup": args.warmup, "timed_steps": args.steps,
                       "stage": stage, "systems": {k: v for k, v in _systems(stage).items()}},
            "notes": "DeepSpeed 0.19.8 reads offload_optimizer.ratio at stage 3 only (at stage "
                     "2 its ratio run is the full offload); ours applies it at every stage.",
        }  # fmt: skip
        path = write_results(
            scenario=f"offload-overlap-{scenario}", device=args.device_name,
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
            path=out_dir / f"offload-overlap-{scenario}-{args.device_name}-{day}.json",
            runs=runs, ratios=_ratios(runs), **notes,
        )  # fmt: skip
        written.append(path)
        print(path.read_text(), flush=True)
    png = out_dir / f"offload-overlap-{args.device_name}-{day}.png"
    _chart(written, png)
    if os.environ.get("OUT") and png.exists():
        import shutil

        shutil.copy(png, Path(os.environ["OUT"]) / png.name)


if __name__ == "__main__":
    main()
