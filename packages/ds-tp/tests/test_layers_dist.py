"""Tier 2 (gloo, tp=2): each parallel layer's output and gradients equal the unsharded layer's
(fp32, 1e-5), and the vocabulary-parallel cross-entropy equals F.cross_entropy.

Every rank builds the full layer from one seed, shards it, runs the same input, and compares its
output, its input gradient and its weight shards' gradients with the full layer's."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ds_tp
from ds_comm.testing import distributed_test

TOL = dict(rtol=1e-5, atol=1e-5)


def _shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    shard = getattr(p, "ds_tp_shard", None)
    return full if shard is None else shard.shard(full)


def _linears(group):
    torch.manual_seed(0)
    col_full = nn.Linear(8, 12)
    row_full = nn.Linear(12, 8)
    x = torch.randn(3, 5, 8)
    probe = torch.randn(3, 5, 8)
    # reference: col -> gelu -> row
    rx = x.clone().requires_grad_()
    ref = row_full(F.gelu(col_full(rx)))
    (ref * probe).sum().backward()
    col = ds_tp.ColumnParallelLinear.from_linear(copy.deepcopy(col_full), group)
    row = ds_tp.RowParallelLinear.from_linear(
        copy.deepcopy(row_full), group, input_is_parallel=True
    )
    px = x.clone().requires_grad_()
    out = row(F.gelu(col(px)))
    (out * probe).sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(px.grad, rx.grad, **TOL)
    for mine, theirs in ((col.weight, col_full.weight), (col.bias, col_full.bias),
                         (row.weight, row_full.weight), (row.bias, row_full.bias)):  # fmt: skip
        torch.testing.assert_close(mine.grad, _shard_of(theirs.grad, mine), **TOL)
    assert col.weight.shape == (6, 8) and row.weight.shape == (8, 6)


def _gather_output_fused_and_unfused_input_split():
    group = dist.group.WORLD
    torch.manual_seed(1)
    # fused gate_up: [gate(6), up(6)] split per sub-parameter, gathered back in fused order
    full = nn.Linear(4, 12)
    x = torch.randn(2, 4)
    probe = torch.randn(2, 12)
    rx = x.clone().requires_grad_()
    ref = full(rx)
    (ref * probe).sum().backward()
    col = ds_tp.ColumnParallelLinear.from_linear(
        copy.deepcopy(full), group, gather_output=True, sub_sizes=(6, 6)
    )
    px = x.clone().requires_grad_()
    out = col(px)
    (out * probe).sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(px.grad, rx.grad, **TOL)
    torch.testing.assert_close(col.weight.grad, _shard_of(full.weight.grad, col.weight), **TOL)
    r = dist.get_rank()
    # rank r holds gate rows [3r, 3r+3) and up rows [6+3r, 6+3r+3)
    torch.testing.assert_close(
        col.weight, torch.cat([full.weight[3 * r : 3 * r + 3], full.weight[6 + 3 * r : 9 + 3 * r]])
    )
    # row-parallel on a replicated input slices it itself
    row_full = nn.Linear(6, 3)
    rx = x.new_ones(2, 6).mul(torch.arange(6.0)).requires_grad_()
    ref = row_full(rx)
    ref.pow(2).sum().backward()
    row = ds_tp.RowParallelLinear.from_linear(
        copy.deepcopy(row_full), group, input_is_parallel=False
    )
    px = rx.detach().clone().requires_grad_()
    out = row(px)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(px.grad, rx.grad, **TOL)


def _vocab_parallel_embedding_and_cross_entropy():
    group = dist.group.WORLD
    rank = dist.get_rank()
    torch.manual_seed(2)
    emb = nn.Embedding(10, 4, padding_idx=1)
    ids = torch.tensor([[0, 1, 5, 9], [7, 3, 1, 4]])
    probe = torch.randn(2, 4, 4)
    (emb(ids) * probe).sum().backward()
    pemb = ds_tp.VocabParallelEmbedding.from_embedding(copy.deepcopy(emb), group)
    out = pemb(ids)
    (out * probe).sum().backward()
    torch.testing.assert_close(out, emb(ids), **TOL)
    torch.testing.assert_close(pemb.weight.grad, emb.weight.grad[rank * 5 : rank * 5 + 5], **TOL)
    for smoothing in (0.0, 0.1):
        for reduction in ("mean", "sum", "none"):
            logits = torch.randn(3, 4, 10) * 3
            target = torch.tensor([[0, 9, -100, 4], [5, 5, 6, 1], [-100, 2, 8, 7]])
            rl = logits.clone().requires_grad_()
            ref = F.cross_entropy(rl.view(-1, 10), target.view(-1), ignore_index=-100,
                                  label_smoothing=smoothing, reduction=reduction)  # fmt: skip
            ref = ref.view(3, 4) if reduction == "none" else ref
            g = torch.randn_like(ref)
            (ref * g).sum().backward()
            pl = logits[..., rank * 5 : rank * 5 + 5].clone().requires_grad_()
            loss = ds_tp.vocab_parallel_cross_entropy(
                pl, target, group, label_smoothing=smoothing, reduction=reduction
            )
            (loss * g).sum().backward()
            torch.testing.assert_close(loss, ref, **TOL)
            torch.testing.assert_close(pl.grad, rl.grad[..., rank * 5 : rank * 5 + 5], **TOL)


def _sequence_parallel_block_equals_full():
    """norm -> column (all-gather along the sequence) -> gelu -> row (reduce-scatter): each
    rank holds half of the sequence between blocks; outputs and all gradients match."""
    group = dist.group.WORLD
    rank = dist.get_rank()
    torch.manual_seed(3)
    norm, up, down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
    x = torch.randn(2, 6, 8)
    probe = torch.randn(2, 6, 8)
    rx = x.clone().requires_grad_()
    ref = rx + down(F.gelu(up(norm(rx))))
    (ref * probe).sum().backward()
    pnorm = nn.LayerNorm(8)
    pnorm.load_state_dict(norm.state_dict())
    pup = ds_tp.ColumnParallelLinear.from_linear(copy.deepcopy(up), group, sequence_parallel=True)
    pdown = ds_tp.RowParallelLinear.from_linear(copy.deepcopy(down), group, sequence_parallel=True)
    ds_tp.sequence_parallel_grad_hooks(pnorm, group)
    ds_tp.sequence_parallel_grad_hooks(pdown, group)
    px = ds_tp.scatter_to_sequence_region(x.clone().requires_grad_(), group, 1)
    px.retain_grad()
    out = px + pdown(F.gelu(pup(pnorm(px))))
    assert out.shape == (2, 3, 8)
    (out * probe[:, rank * 3 : rank * 3 + 3]).sum().backward()
    torch.testing.assert_close(out, ref[:, rank * 3 : rank * 3 + 3], **TOL)
    torch.testing.assert_close(px.grad, rx.grad[:, rank * 3 : rank * 3 + 3], **TOL)
    torch.testing.assert_close(pnorm.weight.grad, norm.weight.grad, **TOL)
    torch.testing.assert_close(pdown.bias.grad, down.bias.grad, **TOL)
    torch.testing.assert_close(pup.weight.grad, _shard_of(up.weight.grad, pup.weight), **TOL)
    torch.testing.assert_close(pdown.weight.grad, _shard_of(down.weight.grad, pdown.weight), **TOL)


@distributed_test(world_size=[2])
def test_parallel_layers_equal_unsharded():
    # one spawn for all layer checks: starting ranks dominates the time of these tiny cases
    _linears(dist.group.WORLD)
    _gather_output_fused_and_unfused_input_split()
    _vocab_parallel_embedding_and_cross_entropy()
    _sequence_parallel_block_equals_full()
