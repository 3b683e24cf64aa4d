"""Fault tolerance, single process: control-flow counting, messages, config errors,
auto-resume and save-on-SIGTERM in a world of one (tier 1)."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
import torch.distributed as dist

import ds_all
from ds_all._config_base import ConfigError
from ds_all.fault import (
    CallCounter,
    SignalFlag,
    collective_from_traceback,
    explain_divergence,
    where,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fault_scripts"))
from train import TinyLM, batch  # noqa: E402


def _config(save_dir: str | None = None, **ckpt) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-3, "warmup_num_steps": 4}},
        "checkpoint": {**({"save_dir": save_dir} if save_dir else {}), **ckpt},
    }
    return cfg


def test_call_counter_names_the_outermost_divergent_module():
    model = TinyLM()
    counter = CallCounter(model)
    model(*batch(0, 0, 0))
    a = counter.snapshot()
    fa = counter.fingerprint()
    counter.reset()
    model.diverge_at = (0, 0)
    model(*batch(0, 0, 0))
    b = counter.snapshot()
    assert a["blocks.1"] == 1 and b["blocks.1"] == 2 and b["blocks.1.1"] == 2
    assert counter.fingerprint() != fa
    why = explain_divergence({0: b, 1: a})
    assert why is not None
    assert "module 'blocks.1' ran 2 time(s) on rank 0, 1 time(s) on rank 1" in why
    assert "blocks.1.1" not in why  # submodules differ only because their parent does
    assert explain_divergence({0: a, 1: dict(a)}) is None
    counter.remove()
    counter.reset()
    model(*batch(0, 0, 0))
    assert counter.snapshot() == {}


def test_collective_named_from_traceback():
    assert not dist.is_initialized()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as exc:  # noqa: BLE001 - torch raises ValueError or RuntimeError
        text = collective_from_traceback(exc.__traceback__)
    assert text.startswith("torch.distributed.all_reduce called from ")
    assert "test_fault_unit.py" in text
    w = where(sys._getframe())
    assert "test_collective_named_from_traceback" in w.innermost and not w.in_collective


@pytest.mark.parametrize("key", ["auto_resume", "save_on_signal"])
def test_resume_and_signal_need_save_dir(key):
    with pytest.raises(ConfigError, match=rf"checkpoint.{key} needs checkpoint.save_dir"):
        ds_all.initialize(model=TinyLM(), config=_config(**{key: True}))


def test_bad_fault_tolerance_keys():
    with pytest.raises(ConfigError, match="fault_tolerance.comms_timeout must be a positive"):
        ds_all.initialize(
            model=TinyLM(), config={**_config(), "fault_tolerance": {"comms_timeout": -1}}
        )
    with pytest.raises(ConfigError, match="fault_tolerance.*did you mean 'comms_timeout'"):
        ds_all.initialize(
            model=TinyLM(), config={**_config(), "fault_tolerance": {"comm_timeout": 5}}
        )


def _train(engine, model, start: int, stop: int) -> list[str]:
    out = []
    for step in range(start, stop):
        loss = engine(*batch(step, 0, 0))
        engine.backward(loss)
        out.append(float(loss.detach()).hex())
        engine.step()
    return out


def _fresh(cfg: dict):
    torch.manual_seed(1234)
    model = TinyLM()
    engine, *_ = ds_all.initialize(model=model, config=cfg)
    return engine, model


def test_auto_resume_continues_bitwise(tmp_path):
    save = str(tmp_path / "ckpt")
    engine, model = _fresh(_config(save, auto_resume=True))
    assert engine.fault.resumed_tag is None  # nothing to resume yet
    full = _train(engine, model, 0, 6)
    engine.close()

    engine, model = _fresh(_config(save, auto_resume=True))
    first = _train(engine, model, 0, 3)
    engine.save_checkpoint(save, client_state={"epoch": 7})
    engine.close()
    engine, model = _fresh(_config(save, auto_resume=True))
    assert engine.fault.resumed_tag == "global_step3" and engine.global_steps == 3
    assert engine.fault.client_state == {"epoch": 7}
    rest = _train(engine, model, engine.global_steps, 6)
    engine.close()
    assert first + rest == full


def test_sigterm_saves_at_the_step_boundary_and_exits_0(tmp_path):
    save = str(tmp_path / "ckpt")
    engine, model = _fresh(_config(save, save_on_signal=True))
    _train(engine, model, 0, 2)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the flag
    loss = engine(*batch(2, 0, 0))
    engine.backward(loss)
    with pytest.raises(SystemExit) as info:
        engine.step()
    assert info.value.code == 0
    assert os.path.isdir(os.path.join(save, "global_step3"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    engine2, _ = _fresh(_config(save, auto_resume=True))
    assert engine2.global_steps == 3
    engine2.close()


def test_second_sigterm_is_not_swallowed():
    flag = SignalFlag()
    assert flag.installed
    seen = []
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested == signal.SIGTERM
        prev = {signal.SIGTERM: lambda *_: seen.append("default")}
        flag._previous.update(prev)  # stand-in for the default action, which would kill pytest
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["default"]
    finally:
        flag.restore()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
