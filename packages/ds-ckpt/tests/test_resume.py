"""Tier 2: resume is bitwise: 2N steps straight == N steps, save, fresh processes, load, N steps.

Two gloo ranks train a small net with dropout (so RNG state matters), data-parallel gradient
averaging, torch AdamW and a StepLR schedule; weights and Adam state go through fragments,
the schedule and the optimizer's hyperparameters (lr, set by the schedule) through
client_state and each rank's RNG through rank_state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_ckpt
from ds_ckpt import Fragment
from ds_comm.testing import run_distributed

N = 4


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), 0.3, training=True))


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _state_fragments(model, opt) -> list[Fragment]:
    frs = []
    for name, p in model.named_parameters():
        frs.append(Fragment.whole(name, p.data))
        st = opt.state[p]
        frs.append(Fragment.whole(f"optimizer.exp_avg.{name}", st["exp_avg"]))
        frs.append(Fragment.whole(f"optimizer.exp_avg_sq.{name}", st["exp_avg_sq"]))
        step = st["step"]
        frs.append(Fragment(f"optimizer.step.{name}", (), step.dtype, 0, 1, step.reshape(1)))
    return frs


def _run(root: str, start: int, stop: int, save_at: int | None, load: bool):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if load:
        for p in model.parameters():  # destinations for the optimizer state
            opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        cs = ds_ckpt.load(root, None, _state_fragments(model, opt))
        sched.load_state_dict(cs["sched"])
        for group, saved in zip(opt.param_groups, cs["param_groups"]):  # lr set by the schedule
            group.update({k: v for k, v in saved.items() if k != "params"})
        ds_ckpt.restore_rng_state(ds_ckpt.load_rank_state(root, None, rank))
        assert cs["step"] == start
    losses = []
    for step in range(start, stop):
        x, y = _batch(step, rank)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        sched.step()
        losses.append(loss.item())
        if save_at is not None and step + 1 == save_at:
            ds_ckpt.save(
                root,
                f"step{step + 1}",
                _state_fragments(model, opt),
                {
                    "sched": sched.state_dict(),
                    "step": step + 1,
                    "param_groups": opt.state_dict()["param_groups"],
                },
                rank_state=ds_ckpt.capture_rng_state(),
            )
    return losses, [p.detach().clone() for p in model.parameters()]


def _straight_then_first_half(root: str):
    """One spawn for both uninterrupted runs: each starts from the same seeds and objects."""
    return _run(root, 0, 2 * N, None, False), _run(root, 0, N, N, False)


def test_resume_is_bitwise(tmp_path):
    root = str(tmp_path)
    both = run_distributed(_straight_then_first_half, 2, args=(root,))
    straight, first = [b[0] for b in both], [b[1] for b in both]
    resumed = run_distributed(_run, 2, args=(root, N, 2 * N, None, True))  # fresh processes
    for rank in range(2):
        assert straight[rank][0] == first[rank][0] + resumed[rank][0]  # bitwise, every step
        for a, b in zip(straight[rank][1], resumed[rank][1]):
            assert torch.equal(a, b)
