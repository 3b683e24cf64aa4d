"""ZeRO-Offload's gradient hand-over in bf16 against fp32, on the CPU (no GPU needed).

    python benchmarks/offload/grad_dtype_cpu_bench.py --params 40e6 --rounds 6

One rank, ``ds_zero.wrap`` at stage 2 with ds-offload's ``OffloadStepper`` (device cpu,
``overlap`` off so CPU Adam runs inside ``step()``), a bf16 stack of Linear layers, clipping on.
Two systems with the same model, data and seed, timed in interleaved rounds (one step each per
round, round 0 warms up):

* ``bf16-grads``: ZeRO hands each partition's gradient over in bf16 (exact on one rank with one
  micro-step per step): 2 bytes per parameter copied to the host buffer and read by CPU Adam;
* ``fp32-grads``: the same run with ZeRO's fp32 hand-over forced (ds-zero 0.1.4's path): the
  reduce step widens the gradient (a pass writing 4 bytes per parameter), 4 bytes copied, 4 read.

Per system: the median seconds of backward (gradient hand-over included) and of ``step()`` (CPU
Adam), and the host gradient buffer bytes per parameter. The two runs' parameters are checked
bitwise equal at the end. On a CPU device the "device-to-host" copy is a host-to-host copy, so
this measures the host memory traffic the change removes, not PCIe; the GPU measurement is
``benchmarks/offload/offload_overlap_gpu.py`` (systems ours-offload-exact and
ours-offload-exact-fp32-grads). Writes benchmarks/results/offload-grad-dtype-<cpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from cpu_adam_bench import cpu_model, slug  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import write_results  # noqa: E402


def _build(params: float, width: int, fp32: bool):
    import torch
    from torch import nn

    import ds_offload
    import ds_zero

    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stepper = ds_offload.OffloadStepper({"device": "cpu", "pin_memory": False, "overlap": False,
                                         "exact_16bit_grads": not fp32})  # fmt: skip
    options = ds_zero.ZeroOptions(stage=2, param_dtype=torch.bfloat16, gradient_clipping=1.0,
                                  reduce_bucket_size=int(25e6))  # fmt: skip
    return ds_zero.wrap(model, opt, options, stepper=stepper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=40e6)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    import ds_kernels
    import ds_offload
    import ds_zero

    systems = {"bf16-grads": _build(args.params, args.width, False),
               "fp32-grads": _build(args.params, args.width, True)}  # fmt: skip
    n = sum(b.layout.shard_numel for b in systems["bf16-grads"].trainable)
    bwd: dict[str, list[float]] = {k: [] for k in systems}
    step: dict[str, list[float]] = {k: [] for k in systems}
    gen = torch.Generator().manual_seed(0)
    for r in range(1 + args.rounds):
        x = torch.randn(args.batch, args.width, generator=gen)
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for name in order:
            zero = systems[name]
            loss = zero(x).float().pow(2).mean()
            t0 = time.perf_counter()
            zero.backward(loss)
            t1 = time.perf_counter()
            zero.step()
            t2 = time.perf_counter()
            if r:
                bwd[name].append(t1 - t0)
                step[name].append(t2 - t1)
        if r:
            print(f"round {r}: " + ", ".join(
                f"{k} bwd {bwd[k][-1]:.3f} s step {step[k][-1]:.3f} s" for k in systems
            ), flush=True)  # fmt: skip
    a, b = (systems[k].full_state_dict() for k in systems)
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    runs = []
    for name, zero in systems.items():
        mem = zero.stepper.host_memory()
        runs.append({
            "system": name,
            "step_s": round(statistics.median(bwd[name]) + statistics.median(step[name]), 4),
            "backward_s": round(statistics.median(bwd[name]), 4),
            "optimizer_step_s": round(statistics.median(step[name]), 4),
            "peak_mem_gb": None,
            "grad_dtype": ",".join(sorted({str(d).removeprefix("torch.")
                                           for d in zero.grad_handover_dtypes})),
            "host_grad_bytes_per_param": mem["gradient_buffers"] / n,
            "host_state_bytes_per_param": mem["optimizer_state_host"] / n,
            "all_backward_s": [round(t, 4) for t in bwd[name]],
            "all_optimizer_step_s": [round(t, 4) for t in step[name]],
        })  # fmt: skip
    by = {r["system"]: r for r in runs}
    ratios = {
        "fp32-grads/bf16-grads step_s": round(by["fp32-grads"]["step_s"] / by["bf16-grads"]["step_s"], 3),
        "fp32-grads/bf16-grads optimizer_step_s": round(
            by["fp32-grads"]["optimizer_step_s"] / by["bf16-grads"]["optimizer_step_s"], 3),
    }  # fmt: skip
    threads = torch.get_num_threads()
    device = f"{slug(cpu_model())}-{threads}t"
    out = write_results(
        path=args.out_dir / f"offload-grad-dtype-{device}-{datetime.date.today():%Y%m%d}.json",
        scenario="offload gradient hand-over bf16 vs fp32 (CPU, one rank, stage 2)",
        device=device, runs=runs, ratios=ratios, params=n, width=args.width, batch=args.batch,
        rounds=args.rounds, bitwise_equal=bitwise, load_average_at_end=list(os.getloadavg()),
        versions={"torch": torch.__version__, "ds_zero": ds_zero.__version__,
                  "ds_offload": ds_offload.__version__, "ds_kernels": ds_kernels.__version__},
    )  # fmt: skip
    print({k: (v["step_s"], v["backward_s"], v["optimizer_step_s"]) for k, v in by.items()},
          ratios, "bitwise", bitwise)  # fmt: skip
    print(f"wrote {out}")
    for z in systems.values():
        z.close()
    return 0 if bitwise else 1


if __name__ == "__main__":
    sys.exit(main())
