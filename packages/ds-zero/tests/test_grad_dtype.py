"""Gradients handed over in the 16-bit compute dtype where that is exact: one rank in the
bucket's group, one micro-step per step, a stepper that keeps its copy in that dtype
(``grad_dtype``) and applies the unscale/clip factor itself. The update and the clipping norm
have the bits of the fp32 hand-over; every other case stays on fp32."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_held_grads import LR, SGDStepper
from zero_helpers import batch, make_model

import ds_zero


class NarrowSGD(SGDStepper):
    """Holds a copy of every gradient in the dtype it asks for (``want``), like an offload
    stepper's host buffers; records the dtypes it was handed."""

    def __init__(self, want: torch.dtype | None) -> None:
        super().__init__()
        self.want = want
        self.copies: dict[int, torch.Tensor] = {}
        self.seen: list[torch.dtype] = []

    def grad_dtype(self, index: int) -> torch.dtype:
        part = self.partitions[index]
        return part.grad_dtype if self.want is None else self.want

    def grad_ready(self, index, grad, early_copy=False) -> None:
        if early_copy:
            self.seen.append(grad.dtype)
            self.copies[index] = grad.clone()

    def holds_grad(self, index) -> bool:
        return index in self.copies

    def skip_step(self) -> None:
        self.copies.clear()

    @torch.no_grad()
    def step(self, grads, grad_scale=None) -> None:
        scale = 1.0 if grad_scale is None else grad_scale
        for i, part in enumerate(self.partitions):
            g = self.copies.pop(i) if grads[i] is None else grads[i]
            part.master.add_(g.float() * scale, alpha=-LR)  # the factor in fp32
            if part.param_shard is not None:
                part.param_shard.copy_(part.master)


def _train(stepper, dtype, *, stage=2, clip=0.05, gas=1, reduce_dtype=torch.float32,
           off_boundary=False, steps=3):  # fmt: skip
    options = ds_zero.ZeroOptions(
        stage=stage, param_dtype=dtype, reduce_dtype=reduce_dtype, reduce_bucket_size=300,
        param_persistence_threshold=30, gradient_clipping=clip, gradient_accumulation_steps=gas,
        loss_scaling=ds_zero.LossScaleOptions(initial_scale_power=8)
        if dtype == torch.float16 else None,
    )  # fmt: skip
    zero = ds_zero.wrap(make_model(), None, options, stepper=stepper)
    rank = dist.get_rank() if dist.is_initialized() else 0
    norms = []
    for s in range(steps):
        for m in range(gas):
            if off_boundary:  # the caller sums two backward passes into one step
                zero.set_gradient_accumulation_boundary(False)
                zero.backward(zero(*batch(s, 1, rank)))
                zero.set_gradient_accumulation_boundary(True)
            zero.backward(zero(*batch(s, m, rank)))
        zero.step()
        norms.append(zero.grad_norm)
    state = zero.full_state_dict()
    dtypes = list(zero.grad_handover_dtypes)
    zero.close()
    return state, norms, dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stage", [2, 3])
def test_one_rank_hands_over_16bit_gradients_with_the_same_bits(stage, dtype):
    for clip in (0.05, 0.0):
        want, want_norms, want_dtypes = _train(NarrowSGD(torch.float32), dtype, stage=stage,
                                               clip=clip)  # fmt: skip
        narrow = NarrowSGD(None)
        got, norms, dtypes = _train(narrow, dtype, stage=stage, clip=clip)
        assert want_dtypes == [torch.float32] * len(dtypes) and dtypes == [dtype] * len(dtypes)
        assert set(narrow.seen) == {dtype}
        assert norms == want_norms, (clip, norms, want_norms)
        if clip:
            assert want_norms[0] > clip  # clipping was active
        for k, v in want.items():
            assert torch.equal(got[k], v), (stage, clip, k)


def test_fp32_hand_over_where_16_bits_would_not_be_exact():
    bf16 = torch.bfloat16
    # accumulation over micro-steps, a reduce dtype that rounds differently, fp32 compute,
    # a stepper keeping fp32 copies
    for kw, dtype, want in [
        ({"gas": 2}, bf16, None), ({"reduce_dtype": torch.float16}, bf16, None),
        ({}, torch.float32, None), ({}, bf16, torch.float32),
    ]:  # fmt: skip
        stepper = NarrowSGD(want)
        _, _, dtypes = _train(stepper, dtype, steps=1, **kw)
        assert set(dtypes) == {torch.float32} and set(stepper.seen) == {torch.float32}, kw


def test_an_accumulation_the_caller_adds_is_summed_in_fp32():
    """One micro-step per step is configured, but the caller marks a backward as not ending
    the window: its gradient is summed with the next one in fp32, handed over in fp32."""
    want, want_norms, _ = _train(NarrowSGD(torch.float32), torch.bfloat16, off_boundary=True)
    narrow = NarrowSGD(None)
    got, norms, dtypes = _train(narrow, torch.bfloat16, off_boundary=True)
    assert dtypes == [torch.bfloat16] * len(dtypes)  # planned, but not taken
    assert set(narrow.seen) == {torch.float32}
    assert norms == want_norms
    for k, v in want.items():
        assert torch.equal(got[k], v), k
