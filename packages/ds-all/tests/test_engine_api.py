"""The engine's DeepSpeed API in one process: accumulation boundaries, get_lr, global_steps,
train/eval, fp16 loss-scale semantics and skipped steps, the steps_per_print line, the
wall-clock breakdown, the CSV and TensorBoard monitors, load_checkpoint's flags, the dataloader
helper, add_config_arguments, and activation checkpointing with CPU offload."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import math
import os
import sys

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402

import ds_all  # noqa: E402


def _engine(**extra):
    torch.manual_seed(0)
    stage = extra.pop("stage", 0)
    gas = extra.pop("gas", 1)
    engine, opt, loader, sched = ds_all.initialize(
        model=TinyGPT(), config=config(stage, 4, gas, **extra), dist_init_required=False
    )
    return engine


def _micro(engine, i: int) -> torch.Tensor:
    x, y = batch(i, 4)
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return loss


class _Lines(logging.Handler):
    """Collects the ds_all logger's lines (it prints to stdout and does not propagate)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _Lines:
        logging.getLogger("ds_all").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("ds_all").removeHandler(self)


def test_boundaries_global_steps_lr_and_train_eval():
    engine = _engine(gas=3)
    assert engine.gradient_accumulation_steps() == 3 and engine.train_batch_size() == 12
    boundaries, steps, lrs = [], [], []
    for i in range(9):
        boundaries.append(engine.is_gradient_accumulation_boundary())
        _micro(engine, i)
        steps.append(engine.global_steps)
        lrs.append(engine.get_lr()[0])
    assert boundaries == [False, False, True] * 3
    assert steps == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    # WarmupLR linear 0 -> 1e-2 over 3 steps: lr = 1e-2 * it / 3, it = optimizer steps - 1
    assert lrs == pytest.approx([0.0] * 5 + [1e-2 / 3] * 3 + [2e-2 / 3])
    assert engine.lr_scheduler.get_last_lr() == pytest.approx([2e-2 / 3])
    assert engine.train() is engine and engine.module.training
    assert engine.eval() is engine and not engine.module.training
    engine.close()


def test_fp16_loss_scale_zero_is_dynamic_and_overflow_skips_the_step():
    """fp16.loss_scale 0 = dynamic scaling from 2**initial_scale_power, halved after
    `hysteresis` (2) overflows; an overflowed step is skipped: weights and the schedule stay,
    global_steps still counts it. A non-zero loss_scale is a static scale."""
    engine = _engine(fp16={"enabled": True, "loss_scale": 0})
    assert engine.loss_scale == 2.0**16
    for i in range(4):  # the first steps overflow at 2**16 in fp16, as they do in DeepSpeed
        _micro(engine, i)
    skipped, scale = engine.skipped_steps, engine.loss_scale
    assert engine.was_step_applied() and 1 <= skipped < 4
    assert scale == 2.0 ** (16 - (skipped - 1))  # the first overflow only spends hysteresis
    before = {k: v.clone() for k, v in engine.zero.full_state_dict().items()}
    lr = engine.get_lr()
    x, y = batch(9, 4)
    engine.backward(engine(x, y) * float("inf"))
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == skipped + 1
    assert engine.global_steps == 5 and engine.get_lr() == lr
    assert engine.loss_scale == scale / 2
    after = engine.zero.full_state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    engine.close()
    static = _engine(fp16={"enabled": True, "loss_scale": 128})
    assert static.loss_scale == 128.0
    for i in range(2):
        _micro(static, i)
    x, y = batch(9, 4)
    static.backward(static(x, y) * float("inf"))
    static.step()
    assert static.loss_scale == 128.0 and static.skipped_steps >= 1  # static: never changes
    static.close()


def test_steps_per_print_line_breakdown_and_csv_monitor(tmp_path):
    engine = _engine(steps_per_print=2, wall_clock_breakdown=True,
                     csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "j"})  # fmt: skip
    with _Lines() as log:
        losses = [float(_micro(engine, i).detach()) for i in range(4)]
    steps = [line for line in log.lines if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 2", "step 4"]
    for line in steps:
        fields = line.split(" | ")
        assert fields[1].startswith("loss ") and fields[2].startswith("lr ")
        assert fields[3].endswith(" samples/s") and float(fields[3].split()[0]) > 0
        # TinyGPT's first integer tensor is the (4, 8) token batch: 32 tokens per step
        assert fields[4].endswith(" tokens/s") and float(fields[4].split()[0]) > 0
        # forward FLOPs counted once (ds-profile) x 3 per micro-step, per device; no MFU on a CPU
        assert fields[5].endswith(" TFLOP/s/device") and float(fields[5].split()[0]) >= 0
        assert fields[6].startswith("grad_norm ")
    assert float(steps[1].split(" | ")[1].split()[1]) == pytest.approx(losses[3], abs=1e-4)
    tokens_per_sample = float(steps[1].split(" | ")[4].split()[0]) / float(
        steps[1].split(" | ")[3].split()[0]
    )
    assert tokens_per_sample == pytest.approx(
        8, rel=0.05
    )  # seq 8: the ratio is exact up to rounding
    breakdown = [line for line in log.lines if line.startswith("time (avg per micro-step)")]
    assert len(breakdown) == 2
    assert all(
        f"{p}: " in breakdown[0] and " ms" in breakdown[0] for p in ("forward", "backward", "step")
    )
    engine.close()
    with open(tmp_path / "j" / "Train_Samples_train_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "Train/Samples/train_loss"]
    # a row per optimizer step (monitors write every step), x axis = samples seen
    assert [int(r[0]) for r in rows[1:]] == [4, 8, 12, 16]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(losses, abs=1e-6)
    assert (tmp_path / "j" / "Train_Samples_lr.csv").exists()


def test_tensorboard_monitor(tmp_path):
    section = {"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            engine = _engine(tensorboard=section)
        _micro(engine, 0)  # training goes on without it
        engine.close()
        assert not (tmp_path / "tb").exists()
    else:
        engine = _engine(tensorboard=section)
        _micro(engine, 0)
        engine.close()
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))


def _optimizer_steps(engine) -> set[float]:
    """Adam's per-parameter step counts (a fresh optimizer has none, or zeros with zero moments)."""
    out = set()
    for state in engine.optimizer.state.values():
        out.add(float(state["step"]))
        if float(state["step"]) == 0:
            assert all(float(t.abs().sum()) == 0 for n, t in state.items() if n != "step")
    return out


def test_load_checkpoint_flags(tmp_path):
    trained = _engine()
    for i in range(3):
        _micro(trained, i)
    trained.save_checkpoint(str(tmp_path), client_state={"epoch": 7})
    saved = {k: v.clone() for k, v in trained.zero.full_state_dict().items()}
    saved_lr = trained.get_lr()
    trained.close()

    def fresh_then_load(**flags):
        e = _engine()
        path, client = e.load_checkpoint(str(tmp_path), **flags)
        assert path.endswith("global_step3") and client == {"epoch": 7}
        for k, v in saved.items():
            assert torch.equal(e.zero.full_state_dict()[k], v), k  # weights always load
        return e

    full = fresh_then_load()
    assert full.global_steps == 3 and full.get_lr() == saved_lr
    assert full.lr_scheduler.last_batch_iteration == 2
    assert _optimizer_steps(full) == {3.0}
    full.close()
    only = fresh_then_load(load_module_only=True)
    assert only.global_steps == 0 and only.lr_scheduler.last_batch_iteration == -1
    assert _optimizer_steps(only) <= {0.0}  # fresh: no state, or zeros
    only.close()
    no_sched = fresh_then_load(load_lr_scheduler_states=False)
    assert no_sched.global_steps == 3 and no_sched.lr_scheduler.last_batch_iteration == -1
    no_sched.close()
    no_opt = fresh_then_load(load_optimizer_states=False)
    assert no_opt.global_steps == 3 and _optimizer_steps(no_opt) <= {0.0}
    no_opt.close()
    e = _engine()
    assert e.load_checkpoint(str(tmp_path / "nothing")) == (None, None)
    e.close()


def test_training_data_gives_a_distributed_sampler_loader():
    data = TensorDataset(torch.arange(20))
    torch.manual_seed(0)
    engine, _, loader, _ = ds_all.initialize(model=TinyGPT(), training_data=data, config=config(0, 4),
                                             dist_init_required=False)  # fmt: skip
    assert isinstance(loader.sampler, DistributedSampler) and loader.batch_size == 4
    first = torch.cat([b[0] for b in loader])
    assert sorted(first.tolist()) == list(range(20))
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(0))  # seed 0, epoch 0
    assert first.tolist() == expected.tolist()
    assert torch.cat([b[0] for b in loader]).tolist() == first.tolist()  # same order each epoch
    engine.close()


def test_add_config_arguments_and_args_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config(1, 4, 2)))
    parser = ds_all.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    assert args.deepspeed is True and args.deepspeed_config == str(path)
    assert parser.parse_args([]).deepspeed is False
    torch.manual_seed(0)
    engine, _, _, _ = ds_all.initialize(args=args, model=TinyGPT(), dist_init_required=False)
    assert engine.zero_optimization_stage() == 1 and engine.gradient_accumulation_steps() == 2
    engine.close()


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.lin(x)) * x


def _grads(block: _Block, x: torch.Tensor, use_checkpoint: bool) -> list[torch.Tensor]:
    block.zero_grad()
    y = ds_all.checkpointing.checkpoint(block, x) if use_checkpoint else block(x)
    y.pow(2).sum().backward()
    return [p.grad.clone() for p in block.parameters()]


def test_activation_checkpointing_recomputes_and_offloads_to_cpu(tmp_path, monkeypatch):
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(3, 6, requires_grad=True)
    plain = _grads(block, x, use_checkpoint=False)
    block.calls = 0
    ds_all.checkpointing.configure(cpu_checkpointing=False)
    assert all(torch.equal(a, b) for a, b in zip(_grads(block, x, True), plain))
    assert block.calls == 2  # forward, then the recomputation in backward

    # the config's activation_checkpointing.cpu_checkpointing keeps saved inputs in CPU memory
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def spy(*a, **k):
        entered.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    try:
        torch.manual_seed(0)
        engine, _, _, _ = ds_all.initialize(model=TinyGPT(), dist_init_required=False,
                                            config=config(0, 4, activation_checkpointing={"cpu_checkpointing": True}))  # fmt: skip
        engine.close()
        block.calls = 0
        assert all(torch.equal(a, b) for a, b in zip(_grads(block, x, True), plain))
        assert len(entered) == 1 and block.calls == 2
        # Megatron-style: configure(mpu, deepspeed_config=<path of the JSON>)
        ds_all.checkpointing.configure(cpu_checkpointing=False)
        path = tmp_path / "ds.json"
        path.write_text(
            json.dumps(config(0, 4, activation_checkpointing={"cpu_checkpointing": True}))
        )
        ds_all.checkpointing.configure(None, deepspeed_config=str(path))
        _grads(block, x, True)
        assert len(entered) == 2
    finally:
        ds_all.checkpointing.configure(cpu_checkpointing=False)
    assert not math.isnan(float(plain[0].sum()))
