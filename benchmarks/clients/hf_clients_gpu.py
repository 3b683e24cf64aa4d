"""DeepSpeed's clients on one GPU: Hugging Face Trainer (ZeRO-3, bf16) and Lightning's
DeepSpeedStrategy (stage 2, bf16) training a GPT-2-medium-shaped model (24 layers, d=1024) for
30 steps, with this repository's `deepspeed` (ds-deepspeed over ds-all) and with DeepSpeed
0.19.8, each in its own process, all from the same initial weights.

    python benchmarks/clients/hf_clients_gpu.py                 # all four systems, results JSON
    python benchmarks/clients/hf_clients_gpu.py --systems ours-trainer deepspeed-trainer
    python benchmarks/clients/hf_clients_gpu.py --cpu-tiny --reference-python /path/to/python

Same weights: the random model is built once here (seeded, on the CPU, no download) and saved
with ``save_pretrained`` to a scratch folder. The Trainer trials load it with
``from_pretrained`` (under ZeRO-3 Transformers builds the model inside ``zero.Init`` and loads
the checkpoint into the partitioned parameters); the Lightning trials build the model in
``configure_model`` and load the same file under ``deepspeed.zero.GatheredParameters``
(``modifier_rank=0``), as a DeepSpeed user loads a checkpoint. Each system's per-step losses
are recorded, and their differences judged:

* first step, ``|loss_ours - loss_deepspeed| <= 1e-3``: the same bf16 weights and batch give the
  same forward; 1e-3 is 16x below the 0.016 first-step gap that different initial weights
  produced (11.037 against 11.021 when each library drew its own);
* every step, ``<= 1e-2``: after the first update the two differ only in how bf16 gradients
  are accumulated and reduced (a bf16 rounding, 2^-8 relative, on some elements). 1e-2 is
  0.1-0.15% of these losses (7-11), below the relative resolution of bf16 itself (0.39%), and
  8x the largest gap measured between the two Lightning runs from equal weights (1.25e-3 over
  30 steps on one H100).

``equal_losses`` is true when both hold for all steps. ``--cpu-tiny`` runs a 2-layer model in
fp32 on the CPU (Trainer only: Lightning's DeepSpeedStrategy needs CUDA), where the tolerance
is 1e-5 for every step (the two libraries' fp32 math differs only in summation order).

Which `deepspeed` a trial imports is chosen by its PYTHONPATH, built here:

* ``ours-*``: a temporary folder holding only a ``deepspeed-<version>.dist-info`` (the metadata
  the clients check; packages run from src/ have none), then ds-deepspeed's src/ and every other
  ``packages/*/src``, then the inherited PYTHONPATH. Our package comes first; its import guard
  sees a real DeepSpeed behind it and is told that this is deliberate
  (``DS_DEEPSPEED_ALLOW_SHADOW=1``).
* ``deepspeed-*``: every ``packages/*/src`` but ds-deepspeed's, then the inherited PYTHONPATH
  (benchmarks/_pythonpath.py), so ``import deepspeed`` finds DeepSpeed 0.19.8 (installed from
  ``.whl/`` by ``benchmarks/gpu_session.sh``, or in site-packages of ``--reference-python``).

Every trial checks which implementation it imported and records it. Results: scenario
``hf-clients``, systems ``ours-trainer``, ``deepspeed-trainer``, ``ours-lightning``,
``deepspeed-lightning`` (step_s: median of the steps after the warm-up, tokens_per_s,
peak_mem_gb, losses), ratios ours/DeepSpeed of tokens_per_s and peak memory and the largest loss
difference of each pair, and ``loss_comparison`` (per pair: both loss lists, the differences,
the tolerances and ``equal_losses``).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

SYSTEMS = ("ours-trainer", "deepspeed-trainer", "ours-lightning", "deepspeed-lightning")
LR, SEED = 1e-4, 0


@dataclass(frozen=True)
class Mode:
    """One size of the benchmark: the model shape, the run length and the loss tolerances."""

    name: str
    device: str
    layers: int
    d_model: int
    heads: int
    vocab: int
    seq: int
    micro: int
    steps: int
    warmup: int  # steps left out of step_s
    bf16: bool
    first_step_tol: float
    every_step_tol: float


MODES = {
    "gpu": Mode("gpu", "cuda", layers=24, d_model=1024, heads=16, vocab=50257, seq=512, micro=4,
                steps=30, warmup=5, bf16=True, first_step_tol=1e-3, every_step_tol=1e-2),
    "cpu-tiny": Mode("cpu-tiny", "cpu", layers=2, d_model=64, heads=2, vocab=512, seq=32, micro=2,
                     steps=6, warmup=1, bf16=False, first_step_tol=1e-5, every_step_tol=1e-5),
}  # fmt: skip


# ------------------------------------------------------------------ shared by the trials
def gpt2_config(mode: Mode) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=mode.vocab, n_positions=max(1024, mode.seq), n_embd=mode.d_model,
                      n_layer=mode.layers, n_head=mode.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)  # fmt: skip


def save_initial_weights(mode: Mode, folder: Path) -> None:
    """The one random model every trial starts from: seeded, built on the CPU, saved."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(SEED)
    GPT2LMHeadModel(gpt2_config(mode)).save_pretrained(folder)


def load_weight_files(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise SystemExit(f"no *.safetensors in {folder}: the initial weights were not saved")
    return state


def token_rows(mode: Mode, n: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, mode.vocab, (n, mode.seq), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


class StepClock:
    """Wall time of each optimizer step (the device synchronised at both ends)."""

    def __init__(self, device: str) -> None:
        self.times: list[float] = []
        self._t0 = 0.0
        self._cuda = device == "cuda"

    def _sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def _which() -> str:
    import importlib.metadata

    import deepspeed

    return f"{deepspeed.__version__} (metadata {importlib.metadata.version('deepspeed')})"


def _summary(mode: Mode, system: str, clock: StepClock, losses: list[float]) -> dict[str, Any]:
    import torch

    steady = clock.times[mode.warmup :] or clock.times
    step_s = statistics.median(steady)
    peak = torch.cuda.max_memory_allocated() / 2**30 if mode.device == "cuda" else None
    return {
        "system": system, "step_s": round(step_s, 5),
        "tokens_per_s": round(mode.micro * mode.seq / step_s, 1),
        "peak_mem_gb": None if peak is None else round(peak, 3),
        "losses": losses, "final_loss": losses[-1] if losses else None,
        "deepspeed": _which(), "steps": len(clock.times),
    }  # fmt: skip


def trial_trainer(mode: Mode, system: str, weights: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "overlap_comm": True,
                              "stage3_gather_16bit_weights_on_model_save": True},
    }  # fmt: skip
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_clients_"), per_device_train_batch_size=mode.micro,
        max_steps=mode.steps, learning_rate=LR, warmup_steps=5, bf16=mode.bf16, logging_steps=1,
        save_strategy="no", report_to=[], deepspeed=ds_config, seed=SEED, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=mode.device == "cpu",
    )  # fmt: skip
    # after TrainingArguments (which registers the ZeRO-3 config): built inside zero.Init and
    # the saved weights loaded into the partitioned parameters
    model, info = AutoModelForCausalLM.from_pretrained(weights, output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise SystemExit(f"{system}: the initial weights did not load: {info}")
    clock = StepClock(mode.device)
    step_losses: list[torch.Tensor] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.start()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.stop()

    class Recording(Trainer):
        """Keeps each step's loss unrounded (the log's may be rounded) without a sync."""

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            out = super().compute_loss(model, inputs, *args, **kwargs)
            step_losses.append((out[0] if isinstance(out, tuple) else out).detach())
            return out

    trainer = Recording(model=model, args=args, train_dataset=token_rows(mode, mode.steps * mode.micro),
                        callbacks=[Clock()])  # fmt: skip
    if mode.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return _summary(mode, system, clock, [float(x) for x in step_losses])


def trial_lightning(mode: Mode, system: str, weights: Path) -> dict[str, Any]:
    import deepspeed
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from torch.utils.data import DataLoader
    from transformers import GPT2LMHeadModel

    clock = StepClock(mode.device)
    losses: list[float] = []
    initial = load_weight_files(weights)

    class Module(L.LightningModule):
        def configure_model(self) -> None:
            if hasattr(self, "gpt"):
                return
            self.gpt = GPT2LMHeadModel(gpt2_config(mode))
            params = list(self.gpt.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                missing, unexpected = self.gpt.load_state_dict(initial, strict=False)
            # save_pretrained leaves out the tied output layer (it is the embedding)
            if set(missing) - {"lm_head.weight"} or unexpected:
                raise SystemExit(f"{system}: weights did not load: {missing} {unexpected}")

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
        accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(stage=2), max_steps=mode.steps,
        precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(token_rows(mode, mode.steps * mode.micro), batch_size=mode.micro, shuffle=False)  # fmt: skip
    trainer.fit(Module(), loader)
    return _summary(mode, system, clock, losses)


def run_trial(mode: Mode, system: str, weights: Path, out: Path) -> None:
    ours = system.startswith("ours")
    import deepspeed

    implemented_here = "+dsall." in deepspeed.__version__
    if implemented_here != ours:
        raise SystemExit(f"{system}: imported deepspeed {deepspeed.__version__} from "
                         f"{deepspeed.__file__}, the wrong implementation")  # fmt: skip
    trial = trial_trainer if system.endswith("trainer") else trial_lightning
    out.write_text(json.dumps(trial(mode, system, weights)))


# ------------------------------------------------------------------ orchestration
def _ours_version() -> str:
    text = (ROOT / "packages/ds-deepspeed/src/deepspeed/_version.py").read_text()
    return text.split('__version__ = "')[1].split('"')[0]


def _trial_env(system: str, meta_dir: Path) -> dict[str, str]:
    from _pythonpath import ALIAS_SRC, pythonpath

    env = dict(os.environ)
    if system.startswith("ours"):
        env["PYTHONPATH"] = os.pathsep.join([str(meta_dir), str(ALIAS_SRC), pythonpath()])
        env["DS_DEEPSPEED_ALLOW_SHADOW"] = "1"
    else:
        env["PYTHONPATH"] = pythonpath(alias=False)
        env.pop("DS_DEEPSPEED_ALLOW_SHADOW", None)
    # DeepSpeed's lone process needs launcher variables (its world of one goes through mpi4py)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29600 + SYSTEMS.index(system)), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")  # fmt: skip
    return env


def _write_metadata(meta_dir: Path) -> None:
    info = meta_dir / f"deepspeed-{_ours_version()}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {_ours_version()}\n"
    )


def compare_losses(ours: list[float], theirs: list[float], mode: Mode) -> dict[str, Any]:
    """Step-by-step differences of two loss curves and the verdict under the mode's tolerances."""
    n = min(len(ours), len(theirs))
    diffs = [abs(a - b) for a, b in zip(ours[:n], theirs[:n])]
    equal = (
        n > 0 and len(ours) == len(theirs) == mode.steps
        and diffs[0] <= mode.first_step_tol and max(diffs) <= mode.every_step_tol
    )  # fmt: skip
    return {
        "ours": ours, "deepspeed": theirs, "abs_diff": diffs, "steps_compared": n,
        "first_step_abs_diff": diffs[0] if diffs else None,
        "max_abs_diff": max(diffs) if diffs else None,
        "tolerance": {"first_step": mode.first_step_tol, "every_step": mode.every_step_tol},
        "equal_losses": equal,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS,
                    help="default: all four on the GPU, the Trainer pair with --cpu-tiny")  # fmt: skip
    ap.add_argument("--cpu-tiny", action="store_true",
                    help="a 2-layer model in fp32 on the CPU, 6 steps (Trainer only)")  # fmt: skip
    ap.add_argument("--reference-python", default=sys.executable,
                    help="the python that runs the deepspeed-* trials (an environment holding "
                    "DeepSpeed 0.19.8; default: this one)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="results file or folder (default: benchmarks/results)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per trial")
    ap.add_argument("--trial", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=sorted(MODES), default="gpu", help=argparse.SUPPRESS)
    ap.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--trial-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    mode = MODES["cpu-tiny" if a.cpu_tiny else a.mode]
    if a.trial:
        run_trial(mode, a.trial, a.weights, a.trial_out)
        return
    systems = a.systems or [s for s in SYSTEMS if mode.device == "cuda" or s.endswith("trainer")]
    if mode.device == "cpu" and any(s.endswith("lightning") for s in systems):
        ap.error(
            "--cpu-tiny runs the Trainer systems only: Lightning's DeepSpeedStrategy needs CUDA"
        )
    import torch
    from _results import write_results

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        meta, weights = Path(tmp) / "meta", Path(tmp) / "initial-weights"
        _write_metadata(meta)
        save_initial_weights(mode, weights)
        for system in systems:
            out = Path(tmp) / f"{system}.json"
            python = sys.executable if system.startswith("ours") else a.reference_python
            cmd = [python, __file__, "--trial", system, "--mode", mode.name, "--weights",
                   str(weights), "--trial-out", str(out)]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=_trial_env(system, meta), timeout=a.timeout,
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0 or not out.exists():
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
                runs.append({"system": system, "step_s": None, "tokens_per_s": None,
                             "peak_mem_gb": None, "error": proc.stderr[-500:] or "no result"})  # fmt: skip
                continue
            run = json.loads(out.read_text())
            run["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(run), flush=True)
            runs.append(run)
    by = {r["system"]: r for r in runs if r.get("tokens_per_s")}
    ratios: dict[str, float] = {}
    comparison: dict[str, Any] = {}
    for kind in ("trainer", "lightning"):
        o, d = by.get(f"ours-{kind}"), by.get(f"deepspeed-{kind}")
        if not (o and d):
            continue
        ratios[f"ours-{kind}/deepspeed-{kind} tokens_per_s"] = round(o["tokens_per_s"] / d["tokens_per_s"], 3)  # fmt: skip
        if o["peak_mem_gb"] and d["peak_mem_gb"]:
            ratios[f"ours-{kind}/deepspeed-{kind} peak_mem_gb"] = round(o["peak_mem_gb"] / d["peak_mem_gb"], 3)  # fmt: skip
        comparison[kind] = compare_losses(o["losses"], d["losses"], mode)
        if comparison[kind]["max_abs_diff"] is not None:
            ratios[f"{kind} max |loss difference|"] = comparison[kind]["max_abs_diff"]
        print(f"{kind}: max |loss difference| {comparison[kind]['max_abs_diff']}, first step "
              f"{comparison[kind]['first_step_abs_diff']}, equal_losses "
              f"{comparison[kind]['equal_losses']}", flush=True)  # fmt: skip
    device = f"1 x {torch.cuda.get_device_name()}" if mode.device == "cuda" else "1 x cpu"
    path = write_results(
        scenario="hf-clients", device=device, runs=runs, ratios=ratios, path=a.out,
        loss_comparison=comparison,
        config={**asdict(mode), "lr": LR, "initial_weights": f"GPT2LMHeadModel, seed {SEED}, "
                "built on the CPU, save_pretrained; loaded by every trial",
                "timed_steps": f"{mode.warmup + 1}-{mode.steps}",
                "trainer": f"ZeRO-3, {'bf16' if mode.bf16 else 'fp32'}, config AdamW + WarmupLR, "
                "from_pretrained under zero.Init",
                "lightning": "DeepSpeedStrategy(stage=2), bf16-mixed, torch AdamW, weights "
                "loaded in configure_model under GatheredParameters"},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
