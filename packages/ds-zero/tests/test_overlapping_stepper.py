"""ZeRO's side of an overlapping stepper (``overlaps_step``): ``step(wait=False)`` returns while
the update runs on another thread, and every read of a partition's parameters waits for it
(stage-3 gathers, unit pre-hooks for replicated buckets, state dicts). A stand-in stepper
(plain SGD per partition on a thread, held until ZeRO waits) must give the same bits as the
same stepper stepping before it returns, and learn the forward's partition order."""

from __future__ import annotations

import threading

import torch
from zero_helpers import batch, make_model

import ds_zero
from ds_comm.testing import run_distributed

LR = 0.05


class ThreadedSGD:
    """SGD on on-device fp32 masters, partition by partition on a worker thread."""

    masters_on_device = True
    accepts_grad_scale = True

    def __init__(self, overlap: bool) -> None:
        self.overlaps_step = overlap
        self.partitions = []
        self.done: dict[int, threading.Event] = {}
        self.release = threading.Event()  # the update is held until ZeRO first waits
        self.thread: threading.Thread | None = None
        self.preferred: list[int] | None = None
        self.waited_while_running = 0

    def setup(self, partitions, group_options) -> None:
        del group_options
        self.partitions = list(partitions)

    def grad_ready(self, index, grad, early_copy=False) -> None:
        del index, grad, early_copy
        self.synchronize()

    def skip_step(self) -> None:
        pass

    def prefer_order(self, indices) -> None:
        self.preferred = list(indices)

    @torch.no_grad()
    def _update(self, order, grads, scale) -> None:
        for i in order:
            if self.overlaps_step:
                assert self.release.wait(timeout=60), "ZeRO never waited for the update"
            part = self.partitions[i]
            part.master.add_(grads[i], alpha=-LR * scale)
            if part.param_shard is not None:
                part.param_shard.copy_(part.master)
            self.done[i].set()

    def step(self, grads, grad_scale=None, wait=True) -> None:
        self.synchronize()
        scale = 1.0 if grad_scale is None else float(grad_scale)
        order = self.preferred or list(range(len(self.partitions)))
        grads = [g.clone() for g in grads]  # ZeRO frees its own on return
        self.done = {i: threading.Event() for i in order}
        self.release.clear()
        if wait or not self.overlaps_step:
            self.release.set()
            self._update(order, grads, scale)
            return
        self.thread = threading.Thread(target=self._update, args=(order, grads, scale))
        self.thread.start()

    def partition_ready(self, index) -> bool:
        event = self.done.get(index)
        return event is None or event.is_set()

    def wait_partition(self, index) -> None:
        if not self.partition_ready(index):
            self.waited_while_running += 1
        self.release.set()
        event = self.done.get(index)
        if event is not None:
            event.wait()

    def synchronize(self) -> None:
        self.release.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def state_tensors(self, index):
        self.synchronize()
        return {"master": self.partitions[index].master}

    def state_loaded(self) -> None:
        self.synchronize()


def _train(stage: int, overlap: bool, steps: int = 4):
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    stepper = ThreadedSGD(overlap)
    options = ds_zero.ZeroOptions(stage=stage, reduce_bucket_size=300,
                                  param_persistence_threshold=30, gradient_clipping=0.5)  # fmt: skip
    zero = ds_zero.wrap(model, None, options, stepper=stepper)
    assert (zero._overlap is not None) == overlap
    losses = []
    for s in range(steps):
        loss = zero(*batch(s, 0, rank))
        zero.backward(loss)
        zero.step()
        losses.append(loss.item())
    state = zero.full_state_dict()
    zero.close()
    return losses, state, stepper


def _check(stage: int) -> None:
    want_losses, want, _ = _train(stage, overlap=False)
    losses, got, stepper = _train(stage, overlap=True)
    assert losses == want_losses
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert stepper.waited_while_running > 0  # reads really met an update in flight
    # the forward's order: the root's partitions (embeddings, head) first, then each block's
    assert stepper.preferred is not None
    assert sorted(stepper.preferred) == list(range(len(stepper.partitions)))


def _check_stages() -> None:
    for stage in (1, 2, 3):
        _check(stage)


def test_overlapping_stepper_gives_the_bits_of_a_stepper_that_waits():
    """Stages 1, 2 and 3 on two ranks (one spawn)."""
    run_distributed(_check_stages, 2, timeout=120)
