"""Dense MoE reference for the tests: every expert runs on every token, no dispatch at all.

Written from the definitions (softmax router in fp32, top-k, Switch/GShard weights, capacity
in priority order), independently of ds_moe's sorting/all-to-all implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import ds_moe


def seed_experts(moe: ds_moe.MoE, seed: int, scale: float = 0.3) -> None:
    """Give global expert g weights drawn from a generator seeded by (seed, g), on any rank."""
    with torch.no_grad():
        for local, g in enumerate(moe.expert_ids):
            gen = torch.Generator().manual_seed(seed * 1000 + g)
            if isinstance(moe.experts, ds_moe.GroupedMLPExperts):
                params = [moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2]
                for p in params:
                    if p is not None:
                        p[local].copy_(torch.randn(p.shape[1:], generator=gen) * scale)
            else:
                for p in moe.experts.experts[local].parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def seed_dense(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def expert_fns(moe: ds_moe.MoE):
    """Callables for the experts of an ep_size=1 layer, by global id."""
    ex = moe.experts
    if isinstance(ex, ds_moe.GroupedMLPExperts):

        def make(e):
            def f(x):
                b1 = None if ex.b1 is None else ex.b1[e]
                b2 = None if ex.b2 is None else ex.b2[e]
                return F.linear(ex.activation(F.linear(x, ex.w1[e], b1)), ex.w2[e], b2)

            return f

        return [make(e) for e in range(ex.num_local_experts)]
    return list(ex.experts)


def expert_params(moe: ds_moe.MoE, local: int) -> list[torch.Tensor]:
    """The parameters (or stacked-parameter slices' owners) of one local expert, with grads."""
    ex = moe.experts
    if isinstance(ex, ds_moe.GroupedMLPExperts):
        return [p[local] for p in (ex.w1, ex.b1, ex.w2, ex.b2) if p is not None]
    return list(ex.experts[local].parameters())


def expert_grads(moe: ds_moe.MoE, local: int) -> list[torch.Tensor]:
    ex = moe.experts
    if isinstance(ex, ds_moe.GroupedMLPExperts):
        return [p.grad[local] for p in (ex.w1, ex.b1, ex.w2, ex.b2) if p is not None]
    return [p.grad for p in ex.experts[local].parameters()]


def dense_moe(moe: ds_moe.MoE, x: torch.Tensor, capacity_factor: float | None = None):
    """Reference (output, l_aux, exp_counts) of an ep_size=1 ``moe`` in eval-like routing.

    Capacity follows the documented rule: slots = max(ceil(k*S*cf/E), min_capacity), served
    first-choice-first, token order inside a choice level (no RTS, no noise).
    """
    cfg = moe.gate.config
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    s, e, k = x.shape[0], cfg.num_experts, cfg.k
    logits = x.float() @ moe.gate.wg.weight.float().t()
    gates = torch.softmax(logits, dim=-1)
    top = torch.topk(gates, k, dim=-1)
    idx, val = top.indices, top.values
    w = val if k == 1 else val / val.sum(-1, keepdim=True)

    keep = torch.ones(s, k, dtype=torch.bool)
    if cfg.drop_tokens:
        cf = capacity_factor
        if cf is None:
            cf = cfg.capacity_factor if moe.training else cfg.eval_capacity_factor
        cap = max(math.ceil(k * s * cf / e), cfg.min_capacity)
        used = [0] * e
        idx_host = idx.cpu()  # the capacity walk is sequential: do it on the host
        for j in range(k):
            for t in range(s):
                ex = int(idx_host[t, j])
                keep[t, j] = used[ex] < cap
                used[ex] += 1
    fns = expert_fns(moe)
    outs = torch.stack([f(x) for f in fns])  # [E, S, M]
    y = torch.zeros_like(x)
    for j in range(k):
        sel = outs[idx[:, j], torch.arange(s, device=x.device)]
        y = y + sel * (w[:, j] * keep[:, j].to(w.device)).unsqueeze(1).to(sel.dtype)
    counts = torch.bincount(idx.reshape(-1), minlength=e)
    me = gates.mean(0)
    ce = counts.float() / (s * k)
    l_aux = e * (me * ce).sum()
    if cfg.router_z_loss_coef:
        l_aux = l_aux + cfg.router_z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    y = y.view(shape)
    if moe.use_residual:
        c = torch.softmax(moe.coefficient(x.view(shape)), -1)
        y = y * c[..., 0:1] + moe.mlp(x.view(shape)) * c[..., 1:2]
    return y, l_aux, counts, keep
