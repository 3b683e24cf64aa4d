"""Tier 1: the MoE layer against the dense reference (ep_size=1, one process)."""

from __future__ import annotations

import pytest
import torch
from moe_reference import dense_moe, seed_dense, seed_experts
from torch import nn

import ds_moe

D = 8


def _mlp(d=D, f=16, act=None, bias=True):
    return nn.Sequential(nn.Linear(d, f, bias=bias), act or nn.GELU(), nn.Linear(f, d, bias=bias))


class _Odd(nn.Module):
    """An expert that is not a plain MLP (runs through LoopExperts)."""

    def __init__(self, d=D):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


def _layer(expert=None, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("top2_2nd_expert_sampling", False)  # the reference picks the top-2
    moe = ds_moe.MoE(D, expert if expert is not None else _mlp(), **kw)
    seed_dense(moe.gate, seed + 1, scale=1.0)
    if moe.use_residual:
        seed_dense(moe.mlp, seed + 2)
        seed_dense(moe.coefficient, seed + 3)
    seed_experts(moe, seed + 4)
    return moe


def _x(shape=(3, 7, D), seed=5):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _grads(module, x):
    gs = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    gs["x"] = x.grad.clone()
    module.zero_grad(set_to_none=True)
    x.grad = None
    return gs


CASES = [
    dict(num_experts=4, k=1, grouped_experts=None),
    dict(num_experts=4, k=2, grouped_experts=None),
    dict(num_experts=6, k=3, grouped_experts=None),
    dict(num_experts=4, k=2, grouped_experts=False),
    dict(num_experts=4, k=2, expert="odd"),
    dict(num_experts=4, k=2, use_residual=True),
    dict(num_experts=4, k=1, use_residual=True, expert="odd"),
    dict(num_experts=3, k=2, expert="nobias"),
    dict(num_experts=4, k=2, router_z_loss_coef=1e-2),
]


def _build(case, **extra):
    case = dict(case)
    kind = case.pop("expert", None)
    expert = {"odd": _Odd(), "nobias": _mlp(bias=False), None: None}[kind]
    return _layer(expert, **case, **extra)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dropless", [False, True])
def test_no_drop_matches_dense_reference_and_its_gradients(case, dropless):
    # capacity_factor large enough that nothing drops, or dropless routing
    kw = (
        {"drop_tokens": False}
        if dropless
        else {"capacity_factor": 8.0, "eval_capacity_factor": 8.0}
    )
    moe = _build(case, use_rts=False, **kw)
    x = _x()
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out, l_aux, counts = moe(x)
    ref, ref_aux, ref_counts, keep = dense_moe(moe, x)
    assert keep.all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_aux, ref_aux)
    assert counts.device == x.device and torch.equal(counts, ref_counts)
    ((out * probe).sum() + 0.5 * l_aux).backward()
    got = _grads(moe, x)
    ((ref * probe).sum() + 0.5 * ref_aux).backward()
    want = _grads(moe, x)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert got["gate.wg.weight"].abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("grouped", [None, False])
def test_capacity_drops_match_reference_and_dropped_tokens_get_zero(k, grouped):
    moe = _layer(num_experts=4, k=k, capacity_factor=0.5, min_capacity=1, use_rts=False,
                 grouped_experts=grouped)  # fmt: skip
    moe.train()
    x = _x((40, D))
    out, _, counts = moe(x)
    ref, _, _, keep = dense_moe(moe, x)
    assert not keep.all(), "the test needs drops"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fully_dropped = ~keep.any(1)
    assert fully_dropped.any()
    # a token with no slot passes through: the layer adds nothing (x + moe(x) == x)
    assert torch.equal(out[fully_dropped], torch.zeros_like(out[fully_dropped]))
    assert int(counts.sum()) == 40 * k  # counts are before capacity


def test_dropped_tokens_go_through_the_residual_branch():
    moe = _layer(num_experts=4, k=1, capacity_factor=0.25, min_capacity=1, use_rts=False,
                 use_residual=True)  # fmt: skip
    x = _x((32, D))
    out, _, _ = moe(x)
    ref, _, _, keep = dense_moe(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dropped = ~keep[:, 0]
    assert dropped.any()
    coef = torch.softmax(moe.coefficient(x), -1)
    only_mlp = moe.mlp(x) * coef[:, 1:2]
    torch.testing.assert_close(out[dropped], only_mlp[dropped])


def test_eval_uses_eval_capacity_factor():
    moe = _layer(num_experts=4, k=1, capacity_factor=4.0, eval_capacity_factor=0.25,
                 min_capacity=1, use_rts=False)  # fmt: skip
    x = _x((32, D))
    moe.train()
    _, _, _, keep_train = dense_moe(moe, x)
    assert keep_train.all()
    moe.eval()
    out, _, _ = moe(x)
    ref, _, _, keep = dense_moe(moe, x)
    assert not keep.all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rts_drops_random_tokens_in_training_only():
    moe = _layer(num_experts=2, k=1, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1,
                 use_rts=True)  # fmt: skip
    with torch.no_grad():
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0, 0] = 1.0  # large x[:, 0] -> expert 0
    x = _x((40, D))
    with torch.no_grad():
        x[:, 0] = 5.0  # everyone wants expert 0: 10 slots for 40 tokens
    moe.train()
    kept_sets = set()
    for _ in range(4):
        out, _, _ = moe(x)
        nz = out.abs().sum(-1) > 0
        assert int(nz.sum()) == 10
        kept_sets.add(tuple(nz.tolist()))
    assert len(kept_sets) > 1
    moe.eval()
    out, _, _ = moe(x)
    assert (out.abs().sum(-1) > 0).tolist() == [True] * 10 + [False] * 30


@pytest.mark.parametrize("policy", ["Jitter", "RSample"])
def test_noisy_gate_only_in_training(policy):
    moe = _layer(num_experts=8, k=1, drop_tokens=False, noisy_gate_policy=policy)
    x = _x((256, D))
    moe.eval()
    a, _, _ = moe(x)
    b, _, _ = moe(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, dense_moe(moe, x)[0], rtol=1e-5, atol=1e-5)
    moe.train()
    outs = [moe(x)[2] for _ in range(4)]
    if policy == "RSample":  # Gumbel sampling changes the chosen experts
        assert any(not torch.equal(outs[0], o) for o in outs[1:])
    train_out, _, _ = moe(x)
    assert not torch.equal(train_out, a)


def test_used_token_excludes_tokens():
    moe = _layer(num_experts=4, k=2, drop_tokens=False)
    x = _x((10, D))
    used = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    out, _, counts = moe(x, used)
    ref = dense_moe(moe, x)[0]
    u = used.bool()
    torch.testing.assert_close(out[u], ref[u], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~u], torch.zeros_like(out[~u]))
    assert int(counts.sum()) == 8 * 2


def test_bf16_matches_fp32_reference_loosely():
    moe = _layer(num_experts=4, k=2, drop_tokens=False)
    x = _x((64, D))
    ref = dense_moe(moe, x)[0]
    out, _, _ = moe.to(torch.bfloat16)(x.detach().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_input_shape_errors():
    moe = _layer(num_experts=4)
    with pytest.raises(ValueError, match=r"last dimension 5 but hidden_size=8"):
        moe(torch.randn(3, 5))
    with pytest.raises(ValueError, match="maps 8 -> 4 features but hidden_size=8"):
        ds_moe.MoE(D, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 4)
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        ds_moe.MoE(D, _mlp(), 4, ep_size=3)
    with pytest.raises(RuntimeError, match="ep_size=2 needs torch.distributed"):
        ds_moe.MoE(D, _mlp(), 4, ep_size=2)
    with pytest.raises(TypeError, match="grouped_experts=True needs"):
        ds_moe.MoE(D, _Odd(), 4, grouped_experts=True)


def test_expert_kind_selection():
    assert isinstance(ds_moe.MoE(D, _mlp(), 4).experts, ds_moe.GroupedMLPExperts)
    assert isinstance(ds_moe.MoE(D, _mlp(act=nn.SiLU()), 4).experts, ds_moe.GroupedMLPExperts)
    assert isinstance(ds_moe.MoE(D, _mlp(), 4, grouped_experts=False).experts, ds_moe.LoopExperts)
    assert isinstance(ds_moe.MoE(D, _Odd(), 4).experts, ds_moe.LoopExperts)
    # every expert starts as a copy of the user's expert
    e = _mlp()
    moe = ds_moe.MoE(D, e, 3)
    for i in range(3):
        assert torch.equal(moe.experts.w1[i], e[0].weight)
        assert torch.equal(moe.experts.b2[i], e[2].bias)


def test_pyramid_layers():
    layers = ds_moe.pyramid_moe_layers(D, _mlp(), num_experts=[2, 4, 8], k=1, use_residual=True)
    assert [m.num_experts for m in layers] == [2, 4, 8]
    assert all(m.use_residual for m in layers)
    x = _x((5, D))
    h = x
    for m in layers:
        out, _, counts = m(h)
        assert counts.numel() == m.num_experts
        h = h + out
    h.sum().backward()
    with pytest.raises(ValueError, match="layer 0: num_experts=3 is not divisible by ep_size=2"):
        ds_moe.pyramid_moe_layers(D, _mlp(), num_experts=[3, 4], ep_size=2)
    with pytest.raises(ValueError, match="one ep_size per layer"):
        ds_moe.pyramid_moe_layers(D, _mlp(), num_experts=[2, 4], ep_size=[1])


def _poison_rows_after_last_group(fn):
    """A grouped GEMM whose rows past offs[-1] come out NaN (the kernels leave them undefined)."""

    def wrapped(a, b, *, offs):
        y = fn(a, b, offs=offs)
        if a.dim() == 2 and b.dim() == 3:
            live = torch.arange(y.shape[0]) < int(offs[-1])
            y = torch.where(live.unsqueeze(1), y, torch.full_like(y, float("nan")))
        return y

    return wrapped


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("grouped", [None, False])
def test_drops_and_an_empty_expert_with_undefined_dead_rows(k, grouped):
    # ep_size 1 runs a static buffer of 1 + S*k rows: the rows past the kept ones (dropped
    # assignments) are never computed; even as NaN they must not reach outputs or gradients.
    from unittest import mock

    from ds_moe import _grouped_gemm

    moe = _layer(num_experts=6, k=k, capacity_factor=0.5, min_capacity=1, use_rts=False,
                 grouped_experts=grouped)  # fmt: skip
    x = _x((37, D))
    with torch.no_grad():  # expert 5 gets no tokens: an empty group
        x[:, 0] = 3.0
        moe.gate.wg.weight[5] = 0.0
        moe.gate.wg.weight[5, 0] = -10.0
    probe = torch.randn(37, D, generator=torch.Generator().manual_seed(3))
    poisoned = _poison_rows_after_last_group(_grouped_gemm._grouped_mm_fn())
    with mock.patch.object(_grouped_gemm, "_grouped_mm_fn", lambda: poisoned):
        out, l_aux, counts = moe(x)
        ((out * probe).sum() + l_aux).backward()
    got = _grads(moe, x)
    assert counts[5] == 0
    ref, ref_aux, _, keep = dense_moe(moe, x)
    assert not keep.all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ((ref * probe).sum() + ref_aux).backward()
    want = _grads(moe, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("k,dropless", [(1, False), (2, False), (2, True)])
def test_ep1_grouped_path_never_reads_device_values_on_the_host(k, dropless):
    # The CPU stand-in for the GPU sync-debug test: with the grouped kernel the ep_size 1
    # forward and backward never turn a tensor into Python numbers (.item/.tolist/bool/int).
    from unittest import mock

    if not ds_moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("no CPU _grouped_mm in this torch")
    moe = _layer(num_experts=4, k=k, capacity_factor=0.75, drop_tokens=not dropless, use_rts=False)
    x = _x((3, 11, D))

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor on the routing path")

    with (
        mock.patch.object(torch.Tensor, "item", refuse),
        mock.patch.object(torch.Tensor, "tolist", refuse),
        mock.patch.object(torch.Tensor, "__bool__", refuse),
        mock.patch.object(torch.Tensor, "__int__", refuse),
    ):
        out, l_aux, counts = moe(x)
        ((out * 1.5).sum() + l_aux).backward()
    ref, _, _, keep = dense_moe(moe, x)
    assert keep.all() if dropless else not keep.all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
