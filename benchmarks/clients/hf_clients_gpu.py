"""DeepSpeed's clients on one GPU: Hugging Face Trainer (ZeRO-3, bf16) and Lightning's
DeepSpeedStrategy (stage 2, bf16) training a GPT-2-medium-shaped model (24 layers, d=1024,
built from its config: no download) for 30 steps, with this repository's `deepspeed`
(ds-deepspeed over ds-all) and with DeepSpeed 0.19.8, each in its own process.

    python benchmarks/clients/hf_clients_gpu.py                 # all four systems, results JSON
    python benchmarks/clients/hf_clients_gpu.py --systems ours-trainer deepspeed-trainer

Which `deepspeed` a trial imports is chosen by its PYTHONPATH, built here:

* ``ours-*``: a temporary folder holding only a ``deepspeed-<version>.dist-info`` (the metadata
  the clients check; packages run from src/ have none), then every ``packages/*/src``, then
  the inherited PYTHONPATH (DeepSpeed's wheels and their dependencies, such as pydantic). Our
  package comes first; its import guard sees the real DeepSpeed behind it and is told that
  this is deliberate (``DS_DEEPSPEED_ALLOW_SHADOW=1``).
* ``deepspeed-*``: the inherited PYTHONPATH and every ``packages/*/src`` except ds-deepspeed's,
  so ``import deepspeed`` finds DeepSpeed 0.19.8 (installed from ``.whl/`` by
  ``benchmarks/gpu_session.sh``, or in site-packages).

Every trial checks which implementation it imported and records it. Results: scenario
``hf-clients``, systems ``ours-trainer``, ``deepspeed-trainer``, ``ours-lightning``,
``deepspeed-lightning`` (step_s: median of steps 6-30, tokens_per_s, peak_mem_gb, losses),
ratios ours/DeepSpeed of tokens_per_s and the largest loss difference of each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

SYSTEMS = ("ours-trainer", "deepspeed-trainer", "ours-lightning", "deepspeed-lightning")
STEPS, WARMUP, MICRO, SEQ, VOCAB = 30, 5, 4, 512, 50257
LR = 1e-4


# ------------------------------------------------------------------ shared by the trials
def gpt2_medium() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


def token_rows(n: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


class StepClock:
    """Wall time of each optimizer step (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        import torch

        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def _which() -> str:
    import importlib.metadata

    import deepspeed

    return f"{deepspeed.__version__} (metadata {importlib.metadata.version('deepspeed')})"


def _summary(system: str, clock: StepClock, losses: list[float]) -> dict[str, Any]:
    import torch

    steady = clock.times[WARMUP:] or clock.times
    step_s = statistics.median(steady)
    return {
        "system": system, "step_s": round(step_s, 5), "tokens_per_s": round(MICRO * SEQ / step_s, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "losses": [round(x, 5) for x in losses], "final_loss": round(losses[-1], 5),
        "deepspeed": _which(), "steps": len(clock.times),
    }  # fmt: skip


def trial_trainer(system: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "overlap_comm": True,
                              "stage3_gather_16bit_weights_on_model_save": True},
    }  # fmt: skip
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_clients_"), per_device_train_batch_size=MICRO,
        max_steps=STEPS, learning_rate=LR, warmup_steps=5, bf16=True, logging_steps=1,
        save_strategy="no", report_to=[], deepspeed=ds_config, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt2_medium())  # zero.Init under ZeRO-3
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.start()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.stop()

    trainer = Trainer(model=model, args=args, train_dataset=token_rows(STEPS * MICRO),
                      callbacks=[Clock()])  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _summary(system, clock, losses)


def trial_lightning(system: str) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from torch.utils.data import DataLoader
    from transformers import GPT2LMHeadModel

    clock = StepClock()
    losses: list[float] = []

    class Module(L.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "gpt"):
                torch.manual_seed(0)
                self.gpt = GPT2LMHeadModel(gpt2_medium())

        def on_train_batch_start(self, batch: Any, idx: int) -> None:
            clock.start()

        def on_train_batch_end(self, outputs: Any, batch: Any, idx: int) -> None:
            clock.stop()
            losses.append(float(outputs["loss"]))

        def training_step(self, batch: dict[str, torch.Tensor], idx: int) -> torch.Tensor:
            return self.gpt(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.0)

    trainer = L.Trainer(
        accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(stage=2), max_steps=STEPS,
        precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(token_rows(STEPS * MICRO), batch_size=MICRO, shuffle=False)
    trainer.fit(Module(), loader)
    return _summary(system, clock, losses)


def run_trial(system: str, out: Path) -> None:
    ours = system.startswith("ours")
    import deepspeed

    implemented_here = "+dsall." in deepspeed.__version__
    if implemented_here != ours:
        raise SystemExit(f"{system}: imported deepspeed {deepspeed.__version__} from "
                         f"{deepspeed.__file__}, the wrong implementation")  # fmt: skip
    result = trial_trainer(system) if system.endswith("trainer") else trial_lightning(system)
    out.write_text(json.dumps(result))


# ------------------------------------------------------------------ orchestration
def _ours_version() -> str:
    text = (ROOT / "packages/ds-deepspeed/src/deepspeed/_version.py").read_text()
    return text.split('__version__ = "')[1].split('"')[0]


def _trial_env(system: str, meta_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    srcs = sorted(str(p) for p in (ROOT / "packages").glob("*/src"))
    ours_src = str(ROOT / "packages/ds-deepspeed/src")
    inherited = [p for p in inherited if p not in srcs]
    if system.startswith("ours"):
        path = [str(meta_dir), ours_src, *[s for s in srcs if s != ours_src], *inherited]
        env["DS_DEEPSPEED_ALLOW_SHADOW"] = "1"
    else:
        path = [*inherited, *[s for s in srcs if s != ours_src]]
        env.pop("DS_DEEPSPEED_ALLOW_SHADOW", None)
    env["PYTHONPATH"] = os.pathsep.join(path)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    # DeepSpeed's lone process needs launcher variables (its world of one goes through mpi4py)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29600 + SYSTEMS.index(system)), TOKENIZERS_PARALLELISM="false")  # fmt: skip
    return env


def _write_metadata(meta_dir: Path) -> None:
    info = meta_dir / f"deepspeed-{_ours_version()}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {_ours_version()}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--trial", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--trial-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per trial")
    a = ap.parse_args()
    if a.trial:
        run_trial(a.trial, a.trial_out)
        return
    import torch
    from _results import write_results

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta"
        _write_metadata(meta)
        for system in a.systems:
            out = Path(tmp) / f"{system}.json"
            cmd = [sys.executable, __file__, "--trial", system, "--trial-out", str(out)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=_trial_env(system, meta), timeout=a.timeout,
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0 or not out.exists():
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
                runs.append({"system": system, "step_s": None, "tokens_per_s": None,
                             "peak_mem_gb": None, "error": proc.stderr[-500:]})  # fmt: skip
                continue
            run = json.loads(out.read_text())
            run["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(run), flush=True)
            runs.append(run)
    by = {r["system"]: r for r in runs if r.get("tokens_per_s")}
    ratios: dict[str, float] = {}
    for kind in ("trainer", "lightning"):
        o, d = by.get(f"ours-{kind}"), by.get(f"deepspeed-{kind}")
        if o and d:
            ratios[f"ours-{kind}/deepspeed-{kind} tokens_per_s"] = round(
                o["tokens_per_s"] / d["tokens_per_s"], 3
            )
            ratios[f"ours-{kind}/deepspeed-{kind} peak_mem_gb"] = round(
                o["peak_mem_gb"] / d["peak_mem_gb"], 3
            )
            n = min(len(o["losses"]), len(d["losses"]))
            ratios[f"{kind} max |loss difference|"] = round(
                max(abs(x - y) for x, y in zip(o["losses"][:n], d["losses"][:n])), 5
            )  # fmt: skip
    device = f"1 x {torch.cuda.get_device_name()}"
    path = write_results(
        scenario="hf-clients", device=device, runs=runs, ratios=ratios,
        config={"model": "GPT-2 medium shape (24 x 1024, vocab 50257)", "seq": SEQ,
                "micro_batch": MICRO, "steps": STEPS, "timed_steps": f"{WARMUP + 1}-{STEPS}",
                "trainer": "ZeRO-3, bf16, config AdamW + WarmupLR",
                "lightning": "DeepSpeedStrategy(stage=2), bf16-mixed, torch AdamW"},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
