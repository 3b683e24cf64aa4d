"""A small regression problem shared by the optimizer tests (importable by spawned ranks).

A linear model fitted to a non-linear target: the loss is convex in the parameters, so every
correct optimizer reaches the same minimum and "within 2% of Adam's loss" is a sharp test; the
shards are non-iid (sorted by the first feature), so a rank that trained on its own shard only
ends far from that minimum (the tests check this control fails the 2% criterion).
"""

import torch

STEPS = 300
LR = 0.05
IN, OUT, ROWS = 8, 2, 256  # ROWS per rank


def make_data(world_size: int):
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(IN, OUT, generator=g)
    x = torch.randn(world_size * ROWS, IN, generator=g)
    x = x[x[:, 0].argsort()]  # non-iid shards
    y = torch.tanh(x @ w_true) + 0.1 * torch.randn(world_size * ROWS, OUT, generator=g)
    return x, y


def make_model() -> torch.nn.Module:
    torch.manual_seed(42)
    return torch.nn.Linear(IN, OUT)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def train(opt_factory, x, y, rank: int, world_size: int, steps: int = STEPS, local: bool = True):
    """Train on this rank's shard (local=True) or the full batch (the single-process reference);
    returns (model, optimizer, loss on the full data)."""
    model = make_model()
    opt = opt_factory(model.parameters())
    if local:
        xs, ys = x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]
    else:
        xs, ys = x, y
    # Linear decay to zero, as at the end of a real schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1 - i / steps))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, xs, ys).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return model, opt, loss_fn(model, x, y).item()


class Lamb(torch.optim.Optimizer):
    """Textbook LAMB (You et al. 2019) with bias correction and a clipped trust ratio, the
    single-process reference for OneBitLamb."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 max_coeff=10.0, min_coeff=0.01):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_coeff=max_coeff, min_coeff=min_coeff))  # fmt: skip

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mh = st["m"] / (1 - b1 ** st["t"])
                vh = st["v"] / (1 - b2 ** st["t"])
                u = mh / (vh.sqrt() + g["eps"]) + g["weight_decay"] * p
                wn, un = p.norm().item(), u.norm().item()
                c = 1.0 if wn == 0 or un == 0 else min(max(wn / un, g["min_coeff"]), g["max_coeff"])
                p.add_(u, alpha=-g["lr"] * c)
