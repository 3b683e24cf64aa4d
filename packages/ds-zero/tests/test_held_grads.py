"""A stepper that keeps its own copy of a partition's gradient (``holds_grad``): ZeRO drops its
device gradient at hand-over, passes None for it to ``step`` and takes the clipping norm from
the norm it had. Same bits as a stepper that reads every gradient at ``step``."""

from __future__ import annotations

import torch
from zero_helpers import batch, make_model

import ds_zero
from ds_comm.testing import run_distributed

LR = 0.05


class SGDStepper:
    """SGD on on-device fp32 masters; reads every gradient at step()."""

    masters_on_device = True
    accepts_grad_scale = True
    overlaps_step = False

    def __init__(self) -> None:
        self.partitions: list = []

    def setup(self, partitions, group_options) -> None:
        del group_options
        self.partitions = list(partitions)

    def grad_ready(self, index, grad, early_copy=False) -> None:
        del index, grad, early_copy

    def skip_step(self) -> None:
        pass

    def _grad(self, index, grad):
        return grad

    @torch.no_grad()
    def step(self, grads, grad_scale=None) -> None:
        scale = 1.0 if grad_scale is None else grad_scale
        for i, part in enumerate(self.partitions):
            g = self._grad(i, grads[i])
            part.master.add_(g * scale, alpha=-LR)
            if part.param_shard is not None:
                part.param_shard.copy_(part.master)

    def state_tensors(self, index):
        return {"master": self.partitions[index].master}

    def state_loaded(self) -> None:
        pass


class CopyingSGD(SGDStepper):
    """Copies the even partitions' gradients as they arrive (the odd ones found no buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: dict[int, torch.Tensor] = {}

    def grad_ready(self, index, grad, early_copy=False) -> None:
        if early_copy and index % 2 == 0:
            self.copies[index] = grad.clone()

    def holds_grad(self, index) -> bool:
        return index in self.copies

    def skip_step(self) -> None:
        self.copies.clear()

    def _grad(self, index, grad):
        if grad is None:
            return self.copies.pop(index)
        assert index not in self.copies, "ZeRO passed a gradient the stepper holds"
        return grad


def _train(stage: int, stepper: SGDStepper, steps: int = 3):
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    options = ds_zero.ZeroOptions(stage=stage, reduce_bucket_size=300,
                                  param_persistence_threshold=30, gradient_clipping=0.05)  # fmt: skip
    zero = ds_zero.wrap(model, None, options, stepper=stepper)
    losses, norms, kept = [], [], []
    for s in range(steps):
        loss = zero(*batch(s, 0, rank))
        zero.backward(loss)
        kept.append([b.grad_shard is not None for b in zero.trainable])
        zero.step()
        losses.append(loss.item())
        norms.append(zero.grad_norm)
    state = zero.full_state_dict()
    zero.close()
    return losses, norms, kept, state


def _check() -> None:
    for stage in (2, 3):
        want_losses, want_norms, want_kept, want = _train(stage, SGDStepper())
        losses, norms, kept, got = _train(stage, CopyingSGD())
        assert all(want_kept[0]), stage  # a stepper without holds_grad: every gradient kept
        # the held (even) partitions' device gradients are gone before step()
        assert kept[0] == [i % 2 == 1 for i in range(len(kept[0]))], (stage, kept[0])
        assert losses == want_losses, stage
        assert norms == want_norms and want_norms[0] > 0.05, stage  # clipping was active
        for k, v in want.items():
            assert torch.equal(got[k], v), (stage, k)
        # a stepper that takes bf16 gradients still gets fp32 ones on two ranks (the reduction
        # sums and divides in fp32), with the same bits as one that asks for fp32
        from test_grad_dtype import NarrowSGD
        from test_grad_dtype import _train as train_dtype

        want, want_norms, _ = train_dtype(NarrowSGD(torch.float32), torch.bfloat16, stage=stage)
        narrow = NarrowSGD(None)
        got, norms, dtypes = train_dtype(narrow, torch.bfloat16, stage=stage)
        assert set(dtypes) == {torch.float32} and set(narrow.seen) == {torch.float32}, stage
        assert norms == want_norms, stage
        for k, v in want.items():
            assert torch.equal(got[k], v), (stage, k)


def test_gradients_held_by_the_stepper_leave_the_device_with_the_same_bits():
    """Stages 2 and 3 on two ranks (one spawn): the norm is all-reduced over both."""
    run_distributed(_check, 2, timeout=120)
