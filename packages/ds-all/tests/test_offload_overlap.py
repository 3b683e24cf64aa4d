"""The offloaded step's modes through the engine (gloo, 2 ranks where it matters):

* the overlapped exact step (default) is bitwise the sequential one (``overlap: false``) at
  stages 1-3 and with stage-3 parameter offload, with every CPU update held back until the next
  forward has started waiting for it (so the waits are what keeps it exact);
* twin-flow (``ratio: 0.5``) equals the all-CPU step to fp32 rounding;
* the one-step-delayed update (``delayed_update``) converges like the exact step;
* DeepSpeed's ``super_offload`` maps to the overlapped step, ``zenflow`` is refused with the
  alternatives."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402

from ds_comm.testing import run_distributed  # noqa: E402


def _gate(stepper) -> None:
    """Hold every CPU Adam of the offload stepper until ZeRO waits for a partition (the next
    forward's first read) or synchronizes: each step's update is in flight when read."""
    reached = threading.Event()
    adam, wait, sync = stepper._cpu_adam, stepper.wait_partition, stepper.synchronize

    def held_adam(*args, **kwargs):
        assert reached.wait(timeout=60), "ZeRO never waited for the update"
        return adam(*args, **kwargs)

    def waiting(index):
        reached.set()
        return wait(index)

    def synchronizing():
        reached.set()
        return sync()

    def step(*args, **kwargs):
        reached.clear()
        return inner_step(*args, **kwargs)

    inner_step = stepper.step
    stepper._cpu_adam, stepper.wait_partition, stepper.synchronize = (
        held_adam,
        waiting,
        synchronizing,
    )
    stepper.step = step


def _train(
    stage: int, offload: dict, param_offload: bool = False, bf16: bool = True, steps=4, clip=0.5
):
    import torch.distributed as dist

    import ds_all

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    cfg = config(stage, 4, gradient_clipping=clip)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", **offload}
    if param_offload:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    stepper = engine.zero.stepper
    if offload.get("overlap", True):
        assert engine.zero._overlap is not None  # ZeRO waits per partition
        # without clipping (bf16, no loss scale) updates start as gradients arrive
        assert engine.zero._final_grads == (clip == 0)
        if clip:
            _gate(stepper)
    losses = []
    for step in range(steps):
        x, y = batch(step, 4 * world)
        sl = slice(rank * 4, (rank + 1) * 4)
        loss = engine(x[sl], y[sl])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = engine.zero.full_state_dict()
    engine.zero.close()
    return losses, state


def _compare_overlap(stage: int, param_offload: bool, clip: float = 0.5) -> None:
    want = _train(stage, {"overlap": False}, param_offload, clip=clip)
    got = _train(stage, {}, param_offload, clip=clip)
    assert got[0] == want[0], (stage, param_offload)
    for k, v in want[1].items():
        assert torch.equal(got[1][k], v), (stage, param_offload, k)


def _compare_ratio(stage: int) -> None:
    want = _train(stage, {"ratio": 1.0}, bf16=False)
    got = _train(stage, {"ratio": 0.5}, bf16=False)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for k, v in want[1].items():
        torch.testing.assert_close(got[1][k], v, rtol=1e-5, atol=1e-6)


def _two_rank_checks() -> None:
    for stage, param_offload in [(1, False), (2, False), (3, False), (3, True)]:
        _compare_overlap(stage, param_offload)
    for stage, param_offload in [(2, False), (3, True)]:  # updates started in backward
        _compare_overlap(stage, param_offload, clip=0.0)
    for stage in (2, 3):
        _compare_ratio(stage)


def test_overlapped_step_is_bitwise_the_sequential_step_and_twin_flow_matches_all_cpu():
    """Two ranks (one spawn for all cases): overlapped == sequential at stages 1, 2, 3 and 3
    with parameter offload (bf16, bitwise), and without clipping (each update starts in
    backward) at stages 2 and 3; ratio 0.5 == ratio 1.0 at stages 2 and 3 (fp32, to
    rounding)."""
    run_distributed(_two_rank_checks, 2, timeout=240)


def _markov_batch(step: int, micro: int = 8, seq: int = 8, vocab: int = 48):
    """A learnable stream: the next token is a fixed permutation of the current one, or with
    probability 1/4 uniform noise, so the loss settles well above zero."""
    g = torch.Generator().manual_seed(step)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(7))
    x = torch.empty(micro, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (micro,), generator=g)
    for t in range(seq):
        noise = torch.rand(micro, generator=g) < 0.25
        x[:, t + 1] = torch.where(
            noise, torch.randint(0, vocab, (micro,), generator=g), perm[x[:, t]]
        )
    return x[:, :-1], x[:, 1:]


def _converge(delayed: bool, steps: int = 300) -> list[float]:
    import ds_all

    torch.manual_seed(0)
    cfg = config(2, 8, optimizer={"type": "AdamW", "params": {"lr": 3e-3}})
    del cfg["scheduler"]
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "delayed_update": delayed}
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    losses = []
    for step in range(steps):
        loss = engine(*_markov_batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.zero.close()
    return losses


def test_delayed_update_converges_like_the_exact_step():
    exact, delayed = _converge(False), _converge(True)
    assert exact[0] == delayed[0]  # the first forward runs on the initial parameters
    assert delayed[1] != exact[1]  # the delayed second forward still does
    assert exact[-1] < 0.8 * exact[0]  # it learns
    final_exact, final_delayed = sum(exact[-20:]) / 20, sum(delayed[-20:]) / 20
    assert final_delayed == pytest.approx(final_exact, rel=0.01)


def test_super_offload_maps_to_the_overlapped_step_and_zenflow_is_refused():
    import ds_all
    from ds_offload import cpu_optimizer_threads

    cfg = config(3, 4)
    cfg["zero_optimization"]["offload_optimizer"] = {
        "device": "cpu",
        "super_offload": True,
        "cpuadam_cores_perc": 0.5,
        "ratio": "auto",
    }
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    stepper = engine.zero.stepper
    assert stepper.overlaps_step and engine.zero._overlap is not None
    assert stepper.num_threads == max(1, int(0.5 * cpu_optimizer_threads(0)))
    assert stepper.ratio == 1.0  # "auto" on a CPU device: everything offloaded
    engine.zero.close()

    cfg = config(2, 4)
    cfg["zero_optimization"]["zenflow"] = {"topk_ratio": 0.05, "overlap_step": True}
    with pytest.raises(Exception, match="delayed_update") as err:
        ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    assert "zenflow" in str(err.value)
