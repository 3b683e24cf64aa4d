"""Accelerate with DeepSpeedPlugin (config with gradient accumulation 2): per micro-step loss,
learning rate and global_steps; save_state / load_state; get_state_dict; unwrap_model.

Runs unchanged against this package and against a real DeepSpeed (the test compares both).
Usage: python accelerate_run.py STAGE OUT.json [STATE_DIR]"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _common import (  # noqa: E402
    ds_config,
    reference,
    samples,
    tiny_gpt2,
    which_deepspeed,
    write_json,
)

STEPS, MICRO, GAS = 4, 2, 2


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    state_dir = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(out), "state")
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler
    from torch.utils.data import DataLoader

    plugin = DeepSpeedPlugin(
        hf_ds_config=ds_config(stage, MICRO, GAS, steps_per_print=float("inf"))
    )
    acc = Accelerator(deepspeed_plugin=plugin)
    world, rank = acc.num_processes, acc.process_index
    model = tiny_gpt2()
    data = samples((STEPS + 2) * GAS * MICRO * world)
    loader = DataLoader(data, batch_size=MICRO, shuffle=False)
    opt = DummyOptim(model.parameters())
    sched = DummyScheduler(opt)
    engine, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    losses, lrs, global_steps = [], [], []

    def micro_step(batch: dict[str, torch.Tensor]) -> float:
        with acc.accumulate(engine):
            loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            lrs.append(engine.get_lr()[0])
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        mean = acc.reduce(loss.detach(), reduction="mean")
        return float(mean)

    it = iter(loader)
    for _ in range(STEPS * GAS):
        losses.append(micro_step(next(it)))
        global_steps.append(engine.global_steps)
    acc.save_state(state_dir)
    after_save = [micro_step(next(it)) for _ in range(GAS)]
    acc.load_state(state_dir)
    it2 = iter(loader)
    for _ in range(STEPS * GAS):
        next(it2)
    after_load = [micro_step(next(it2)) for _ in range(GAS)]
    state = acc.get_state_dict(engine)
    unwrapped = acc.unwrap_model(engine)
    result = {
        "deepspeed": which_deepspeed(), "world": world, "losses": losses, "lrs": lrs,
        "global_steps": global_steps, "after_save": after_save, "after_load": after_load,
        "unwrapped_type": type(unwrapped).__name__,
    }  # fmt: skip
    if rank == 0 and world == 1 and os.environ.get("CLIENT_REFERENCE") == "1":
        # plain PyTorch, same model/data/optimizer/schedule/clipping, in this process
        ref = reference(STEPS, MICRO, GAS)
        result["reference"] = {"losses": ref["losses"], "lrs": ref["lrs"]}
    if rank == 0:
        result["state"] = {k: v.float().flatten()[:8].tolist() for k, v in state.items()}
        result["state_keys"] = sorted(state)
        write_json(out, result)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
