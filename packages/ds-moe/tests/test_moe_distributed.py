"""Tier 2: expert parallelism on gloo ranks against the ep_size=1 dense reference.

Each rank builds the same layer twice: with ``ep_size=P`` (experts spread over P ranks, tokens
moved by all-to-all) and with ``ep_size=1`` holding every expert (the reference, run in-process
on the inputs of every rank of the expert-parallel group, which each rank regenerates from
seeds). Outputs, aux losses, counts and all gradients must agree.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from moe_reference import dense_moe, expert_grads, seed_dense, seed_experts
from torch import nn

import ds_comm
import ds_moe
from ds_comm.testing import distributed_test

D = 8


def _mlp():
    return nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


def _build(ep, expert, seed=0, **kw):
    torch.manual_seed(seed)
    moe = ds_moe.MoE(D, expert, ep_size=ep, use_rts=False, top2_2nd_expert_sampling=False, **kw)
    seed_dense(moe.gate, seed + 1, scale=1.0)
    if moe.use_residual:
        seed_dense(moe.mlp, seed + 2)
        seed_dense(moe.coefficient, seed + 3)
    seed_experts(moe, seed + 4)
    return moe.train()


def _inputs(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    n = 10 + 3 * rank  # uneven token counts per rank
    return torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)


def _loss(out, l_aux, probe):
    return (out * probe).sum() + 0.3 * l_aux


CONFIGS = [
    dict(num_experts=8, k=1, capacity_factor=8.0, expert="mlp"),
    dict(num_experts=4, k=2, capacity_factor=0.5, min_capacity=1, expert="odd"),
    dict(num_experts=8, k=2, drop_tokens=False, use_residual=True, expert="mlp"),
    dict(num_experts=8, k=3, capacity_factor=0.75, min_capacity=1, expert="mlp",
         grouped_experts=False),
    # the CUDA layout: every local expert's rows padded to 16 for the grouped kernel
    dict(num_experts=8, k=2, capacity_factor=1.0, min_capacity=1, expert="mlp", align16=True),
]  # fmt: skip


def _check_config(cfg, ep):
    cfg = dict(cfg)
    expert = _mlp() if cfg.pop("expert") == "mlp" else _Odd()
    if cfg.pop("align16", False):
        from unittest import mock

        from ds_moe import _experts

        with mock.patch.object(_experts, "row_alignment", lambda device: 16):
            return _check_config_body(cfg, ep, expert)
    return _check_config_body(cfg, ep, expert)


def _check_config_body(cfg, ep, expert):
    import torch.distributed as dist

    rank = dist.get_rank()
    moe = _build(ep, expert, **cfg)
    ref = _build(1, expert, **cfg)
    group_ranks = [rank - rank % ep + i for i in range(ep)]

    x, probe = _inputs(rank)
    x.requires_grad_()
    out, l_aux, counts = moe(x)
    _loss(out, l_aux, probe).backward()

    # reference for this rank alone: output, aux, counts, input and dense gradients
    xr = x.detach().clone().requires_grad_()
    r_out, r_aux, r_counts, keep = dense_moe(ref, xr)
    _loss(r_out, r_aux, probe).backward()
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_aux, r_aux)
    assert torch.equal(counts, r_counts)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        moe.gate.wg.weight.grad, ref.gate.wg.weight.grad, rtol=1e-5, atol=1e-5
    )
    if moe.use_residual:
        for a, b in zip(moe.mlp.parameters(), ref.mlp.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)

    # expert gradients: the owner accumulates every group rank's tokens through the all-to-all,
    # and the layer divides by ep so that the local gradient is the per-rank mean
    ref.zero_grad(set_to_none=True)
    total = 0
    for r in group_ranks:
        xo, po = _inputs(r)
        o, a, _, _ = dense_moe(ref, xo)
        total = total + _loss(o, a, po)
    total.backward()
    for local, g in enumerate(moe.expert_ids):
        for got, want in zip(expert_grads(moe, local), expert_grads(ref, g)):
            torch.testing.assert_close(got, want / ep, rtol=1e-4, atol=1e-5)
    return bool((~keep).any())


@distributed_test(world_size=[2, 4], timeout=240)
def test_expert_parallel_matches_ep1(world_size):
    import torch.distributed as dist

    rank = dist.get_rank()
    eps = [2] if world_size == 2 else [2, 4]
    dropped_somewhere = False
    for ep in eps:
        for cfg in CONFIGS:
            dropped_somewhere |= _check_config(cfg, ep)
        # groups: experts split over consecutive ranks, reduced over strided ranks
        name = f"ep_size_{ep}"
        dp = ds_moe.get_expert_data_parallel_group(name)
        assert dist.get_process_group_ranks(dp) == list(range(rank % ep, world_size, ep))
        epg = ds_moe.get_expert_parallel_group(name)
        assert dist.get_process_group_ranks(epg) == [rank - rank % ep + i for i in range(ep)]
        moe = ds_moe.MoE(D, _mlp(), num_experts=4, ep_size=ep)
        assert moe.expert_ids == tuple(range((rank % ep) * (4 // ep), (rank % ep + 1) * (4 // ep)))
        for p in moe.experts.parameters():
            assert p.ds_expert and p.ds_expert_group_name == name and p.ds_expert_dp_group is dp
        # a deep copy (EMA / reference model) shares the groups and keeps the marks
        clone = copy.deepcopy(moe)
        assert clone.ep_group is epg and clone.expert_dp_group is dp
        for p in clone.experts.parameters():
            assert p.ds_expert and p.ds_expert_dp_group is dp
    assert dropped_somewhere, "the configs must exercise capacity drops"
    if world_size == 2:
        _check_rank_with_no_tokens_for_a_peer()


def _check_rank_with_no_tokens_for_a_peer():
    # rank 1 routes nothing to rank 0's experts (and rank 0 nothing at all to rank 1's):
    # zero-row all-to-all splits and empty expert groups must work in forward and backward
    import torch.distributed as dist

    rank = dist.get_rank()
    moe = _build(2, _mlp(), num_experts=4, k=1, drop_tokens=False)
    ref = _build(1, _mlp(), num_experts=4, k=1, drop_tokens=False)
    with torch.no_grad():
        for m in (moe, ref):
            m.gate.wg.weight.zero_()
            m.gate.wg.weight[0 if rank == 0 else 3, 0] = 1.0
    x = torch.ones(6, D, requires_grad=True)
    logger = ds_comm.get_comms_logger()
    logger.reset()
    logger.enable()
    try:
        out, _, counts = moe(x)
        assert counts.tolist() == ([6, 0, 0, 0] if rank == 0 else [0, 0, 0, 6])
        out.sum().backward()
    finally:
        logger.disable()
    # the MoE traffic is logged by name: one counts exchange, one all-to-all each way and back
    for name in (
        "moe_counts",
        "moe_dispatch",
        "moe_combine",
        "moe_dispatch_bwd",
        "moe_combine_bwd",
    ):
        assert sum(s.count for s in logger.get(name)) == 1, name
    assert logger.total_bytes("moe_dispatch") == 6 * D * 4
    logger.reset()
    xr = x.detach().clone().requires_grad_()
    r_out = dense_moe(ref, xr)[0]
    r_out.sum().backward()
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(x.grad, xr.grad)


class _Net(nn.Module):
    def __init__(self, ep):
        super().__init__()
        torch.manual_seed(7)
        self.inp = nn.Linear(D, D)
        self.moe = ds_moe.MoE(D, _mlp(), num_experts=4, ep_size=ep, k=2, capacity_factor=1.0,
                              min_capacity=1, use_rts=False, top2_2nd_expert_sampling=False)  # fmt: skip
        self.head = nn.Linear(D, 3)
        seed_dense(self.moe.gate, 8, scale=1.0)
        seed_experts(self.moe, 9)

    def forward(self, x, y):
        h = torch.tanh(self.inp(x))
        m, l_aux, _ = self.moe(h)
        return F.cross_entropy(self.head(h + m), y) + 0.01 * l_aux


def _batch(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, D, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _reference_losses(world_size, steps, clip=0.0):
    ref = _Net(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = sum(ref(*_batch(step, r)) for r in range(world_size)) / world_size
        loss.backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            assert norm > clip, "the test wants clipping to be active"
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return ref, losses


def _mean_over_ranks(loss):
    import torch.distributed as dist

    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean / dist.get_world_size()


STEPS = 4


@distributed_test(world_size=4, timeout=300)
def test_training_matches_single_process_ddp_style_and_under_zero(world_size):
    """MoE training on 4 ranks gives the single-process losses: with the expert-aware
    DDP-style reduction (``reduce_gradients``, also checking the weights) and under ds-zero
    stages 1, 2 and 3 with global-norm clipping (expert parameters reduced and partitioned over
    their expert-data-parallel group through the ``ds_expert``/``ds_expert_dp_group``
    attributes)."""
    import torch.distributed as dist

    import ds_zero

    rank = dist.get_rank()
    ref, ref_losses = _reference_losses(world_size, STEPS)
    for ep in (2, 4):
        net = _Net(ep)
        opt = torch.optim.SGD(
            ds_moe.split_params_into_different_moe_groups_for_optimizer(net.parameters()),
            lr=0.2, momentum=0.9,
        )  # fmt: skip
        for step in range(STEPS):
            loss = net(*_batch(step, rank))
            loss.backward()
            ds_moe.reduce_gradients(net.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.testing.assert_close(
                _mean_over_ranks(loss), ref_losses[step], rtol=1e-5, atol=1e-6
            )
        for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
            if ds_moe.is_moe_param(p):
                q = q[list(net.moe.expert_ids)]
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)

    # Global-norm clipping is active: it only matches if expert gradients come out of the
    # reduction on the same scale as dense ones (see _dispatch._run_experts).
    clip = 0.05
    _, clipped_losses = _reference_losses(world_size, STEPS, clip)
    for stage, ep in ((1, 2), (2, 2), (3, 2), (3, 4)):
        net = _Net(ep)
        opt = torch.optim.SGD(
            ds_moe.split_params_into_different_moe_groups_for_optimizer(net.parameters()),
            lr=0.2, momentum=0.9,
        )  # fmt: skip
        # tiny buckets and no persistent parameters: several buckets, every tensor sharded
        options = ds_zero.ZeroOptions(
            stage=stage, reduce_bucket_size=64, param_persistence_threshold=0,
            gradient_clipping=clip,
        )  # fmt: skip
        zero = ds_zero.wrap(net, opt, options)
        for step in range(STEPS):
            loss = zero(*_batch(step, rank))
            zero.backward(loss)
            zero.step()
            got = _mean_over_ranks(loss)
            torch.testing.assert_close(got, clipped_losses[step], rtol=1e-5, atol=1e-6,
                                       msg=f"stage {stage} ep {ep} step {step}")  # fmt: skip
        _check_state_partitioned(zero, net, ep, world_size)


def _check_state_partitioned(zero, net, ep, world_size):
    """ZeRO holds each element of master weights and optimizer state once per reduction group:
    expert parameters once per expert-data-parallel group (of world/ep ranks, whose members
    hold the same experts), dense ones once over the whole world; with more than one rank in
    that group no rank holds all of it."""
    import torch.distributed as dist

    params = dict(net.named_parameters())
    names = sorted(params)
    kinds = ("master", "state")
    held = torch.zeros(len(kinds), len(names))
    for f in zero.state_fragments():
        kind = 0 if f.name in params else 1
        pname = f.name if kind == 0 else f.name.split(".", 2)[2]  # optimizer.<key>.<param>
        held[kind, names.index(pname)] += f.numel
    # SGD with momentum: one optimizer tensor (momentum_buffer) per parameter
    # ZeRO-3 releases parameters as 0-element tensors (as DeepSpeed does): their full size is
    # ds_numel
    numel = torch.tensor([float(getattr(params[n], "ds_numel", params[n].numel())) for n in names])
    expert = torch.tensor([ds_moe.is_moe_param(params[n]) for n in names])
    assert expert.any() and (~expert).any()
    over_world, over_edp = held.clone(), held.clone()
    dist.all_reduce(over_world)
    dist.all_reduce(over_edp, group=ds_moe.get_expert_data_parallel_group(f"ep_size_{ep}"))
    for kind in range(len(kinds)):
        torch.testing.assert_close(over_edp[kind][expert], numel[expert], msg=kinds[kind])
        torch.testing.assert_close(over_world[kind][~expert], numel[~expert], msg=kinds[kind])
    if world_size // ep > 1:  # partitioned, not replicated, inside the expert-dp group
        assert held[:, expert].sum() < 2 * numel[expert].sum()
    assert held[:, ~expert].sum() < 2 * numel[~expert].sum()
