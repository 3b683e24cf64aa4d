"""Hugging Face Trainer with a DeepSpeed config (ZeRO-2 or 3, config-defined AdamW + WarmupLR,
gradient accumulation 2): train with a checkpoint half way, resume from it in a second Trainer,
save_model, and the zero_to_fp32 weights of the last checkpoint.

Usage: python trainer_run.py STAGE OUT_DIR   (plain python, torchrun or ds-launch)"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _common import SEQ, samples, tiny_gpt2, which_deepspeed, write_json  # noqa: E402

STEPS, HALF, MICRO, GAS = 4, 2, 2, 2


def hf_config(stage: int) -> dict:
    # "auto" everywhere Trainer fills values in from TrainingArguments, as its docs show
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },  # fmt: skip
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": "auto",
                "warmup_max_lr": "auto",
                "warmup_num_steps": "auto",
            },
        },  # fmt: skip
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }


def trainer(stage: int, out: str, max_steps: int) -> object:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=GAS,
        max_steps=max_steps, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_steps=HALF, save_strategy="steps",
        report_to=[], deepspeed=hf_config(stage), seed=0, data_seed=0, disable_tqdm=True,
        save_only_model=False, dataloader_num_workers=0,
        # CPU ranks: Accelerate builds the gloo group itself only when told the run is on CPU
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = samples(STEPS * GAS * MICRO * world)
    # built after TrainingArguments, as users do: at stage 3 from_config runs zero.Init
    return Trainer(model=tiny_gpt2(from_config=True), args=args, train_dataset=data)


def losses(t: object) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}  # type: ignore[attr-defined]


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    full = trainer(stage, os.path.join(out, "full"), STEPS)
    full.train()
    full_losses = losses(full)
    full.save_model(os.path.join(out, "final"))
    engine = full.model_wrapped
    rank = int(os.environ.get("RANK", "0"))
    final_state = (
        engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module_state_dict()
    )
    resumed = trainer(stage, os.path.join(out, "resumed"), STEPS)
    resumed.train(resume_from_checkpoint=os.path.join(out, "full", f"checkpoint-{HALF}"))
    resumed_losses = losses(resumed)
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(
            os.path.join(out, "full", f"checkpoint-{STEPS}")
        )
        max_diff = max(
            float((fp32[k].float() - final_state[k].float()).abs().max()) for k in fp32
        )  # fmt: skip
        missing = sorted(set(final_state) - set(fp32) - {"lm_head.weight"})
        write_json(os.path.join(out, "result.json"), {
            "deepspeed": which_deepspeed(), "world": int(os.environ.get("WORLD_SIZE", "1")),
            "full": full_losses, "resumed": resumed_losses, "zero_to_fp32_max_diff": max_diff,
            "zero_to_fp32_missing": missing, "seq": SEQ,
            "saved": sorted(os.listdir(os.path.join(out, "final"))),
            "lr_last": full.lr_scheduler.get_last_lr()[0] if full.lr_scheduler else None,
        })  # fmt: skip


if __name__ == "__main__":
    main()
