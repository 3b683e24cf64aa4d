"""Lightning's DeepSpeedStrategy (CUDA only in Lightning) on one GPU with a tiny GPT-2: per-step
losses next to the same training in plain PyTorch on the same GPU, both from the same weights.

Lightning builds the model in ``configure_model`` under its init context: at stage 2 on the GPU
(its CUDA generator draws the weights, not the CPU generator the plain run's model used), at
stage 3 inside ``deepspeed.zero.Init``, where each submodule's parameters are partitioned as its
``__init__`` returns, so Transformers' weight init in ``post_init`` (not wrapped in
``GatheredParameters``: Lightning sets no ``HfDeepSpeedConfig``) writes into released, empty
parameters and does nothing, with DeepSpeed as with ds-all. The built model therefore loads the
plain run's initial weights, as a DeepSpeed user loads a checkpoint into a model built under
ZeRO-3: inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)`` (which passes whole
parameters through at stage 2). The loader keeps its order (``use_distributed_sampler=False``:
Lightning would otherwise shuffle the training set under any distributed strategy, DeepSpeed's
included). The comparison then tests the strategy's training math alone.

Lightning refuses DeepSpeedStrategy on anything but CUDA in two checks (the accelerator's type,
the device indices), nowhere else. ``cpu`` as a third argument lifts those two checks and runs the
same Trainer, strategy and engine on the CPU (gloo), so CI exercises Lightning's whole DeepSpeed
path without a GPU.

Usage: python lightning_run.py STAGE OUT.json [cpu]"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _common import LR, samples, tiny_gpt2, which_deepspeed, write_json  # noqa: E402

STEPS, MICRO, GAS = 4, 2, 2


def plain(device: torch.device) -> list[float]:
    model = tiny_gpt2().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    data = samples(STEPS * GAS * MICRO)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for k in range(GAS):
            rows = data[(step * GAS + k) * MICRO : (step * GAS + k + 1) * MICRO]
            ids = torch.stack([r["input_ids"] for r in rows]).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / GAS).backward()
            total += float(loss) / GAS
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _allow_cpu() -> None:
    """Let DeepSpeedStrategy set up on the CPU: skip its CUDA-accelerator check (going straight
    to DDPStrategy's own setup) and its device-index check (CPU devices have no index)."""
    import lightning.pytorch.strategies.deepspeed as strategy_module
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    DeepSpeedStrategy.setup_environment = DDPStrategy.setup_environment
    strategy_module._validate_device_index_selection = lambda devices: None


def main() -> None:
    import deepspeed
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from torch.utils.data import DataLoader

    stage, out = int(sys.argv[1]), sys.argv[2]
    on_cpu = sys.argv[3:] == ["cpu"]
    if on_cpu:
        _allow_cpu()
    device = torch.device("cpu" if on_cpu else "cuda")
    losses: list[float] = []
    # the weights plain() starts from: tiny_gpt2() is seeded and built on the CPU
    initial = {k: v.clone() for k, v in tiny_gpt2().state_dict().items()}

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.window: list[float] = []

        def configure_model(self) -> None:
            # under zero.Init at stage 3 (Lightning's model_sharded_context)
            if not hasattr(self, "gpt"):
                self.gpt = tiny_gpt2()
                params = list(self.gpt.parameters())
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    self.gpt.load_state_dict(initial)

        def training_step(self, batch: dict[str, torch.Tensor], idx: int) -> torch.Tensor:
            loss = self.gpt(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            self.window.append(float(loss.detach()) / GAS)
            if len(self.window) == GAS:
                losses.append(sum(self.window))
                self.window = []
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.0)

    trainer = L.Trainer(
        accelerator=device.type, devices=1, strategy=DeepSpeedStrategy(stage=stage), max_steps=STEPS,
        accumulate_grad_batches=GAS, precision="32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        # DeepSpeedStrategy is a distributed strategy: by default Lightning swaps the loader's
        # sampler for a DistributedSampler that shuffles the training set, and the batches would
        # no longer be the plain run's
        use_distributed_sampler=False,
    )  # fmt: skip
    loader = DataLoader(samples(STEPS * GAS * MICRO), batch_size=MICRO, shuffle=False)
    trainer.fit(Module(), loader)
    write_json(out, {"deepspeed": which_deepspeed(), "losses": losses,
                     "plain": plain(device)})  # fmt: skip


if __name__ == "__main__":
    main()
