"""Tier 3 (GPU): the grouped-GEMM path on CUDA in bf16 against the loop and the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_reference import dense_moe, seed_dense, seed_experts
from torch import nn

import ds_moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_grouped_mm_runs_on_this_gpu_in_bf16():
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("torch._grouped_mm's CUDA kernels need sm90+ in the torch releases we target")
    assert ds_moe.grouped_mm_available(
        torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    )


@pytest.mark.parametrize("sizes", [[37, 0, 200, 5], [0, 0, 64, 0], [128, 128, 128, 128]])
def test_grouped_experts_match_loop_on_cuda(sizes):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    grouped = ds_moe.GroupedMLPExperts(mlp, 4).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in grouped.parameters():
            p.normal_(0, 0.05)
    loop = ds_moe.GroupedMLPExperts(mlp, 4, use_grouped_mm=False).cuda().to(torch.bfloat16)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(sum(sizes), 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    res = []
    for m in (grouped, loop):
        xi = x.clone().requires_grad_()
        y = m(xi, sizes)
        y.backward(g)
        res.append([y, xi.grad, *[p.grad for p in m.parameters()]])
    for a, b in zip(*res):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("k", [1, 2])
def test_layer_on_cuda_matches_reference(k):
    torch.manual_seed(0)
    d = 128
    moe = ds_moe.MoE(d, nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
                     num_experts=8, k=k, capacity_factor=1.0, use_rts=False,
                     top2_2nd_expert_sampling=False)  # fmt: skip
    seed_dense(moe.gate, 1, scale=0.2)
    seed_experts(moe, 2, scale=0.05)
    moe = moe.cuda().train()
    x = torch.randn(4, 300, d, device="cuda")
    ref, ref_aux, ref_counts, keep = dense_moe(moe, x)
    out32, aux32, counts = moe(x)
    torch.testing.assert_close(out32, ref, rtol=1e-3, atol=1e-3)  # fp32 (TF32 off by default)
    torch.testing.assert_close(aux32, ref_aux)
    assert counts.device.type == "cuda" and torch.equal(counts, ref_counts)
    # bf16: against the reference of the bf16 layer itself. Rounding the weights moves some
    # tokens across capacity limits, so the fp32 reference routes (and drops) other tokens.
    moe16, x16 = moe.to(torch.bfloat16), x.to(torch.bfloat16)
    ref16, _, counts16, _ = dense_moe(moe16, x16)
    out16, _, got_counts16 = moe16(x16)
    assert torch.equal(got_counts16, counts16)
    torch.testing.assert_close(out16.float(), ref16.float(), rtol=5e-2, atol=5e-2)
    assert not keep.all()  # capacity 1.0 drops some tokens on a random router


@pytest.mark.parametrize("k", [1, 2])
def test_router_never_syncs_with_the_host(k):
    # the only host sync of a forward is the dispatch plan's one copy of the counts
    logits = torch.randn(4096, 8, device="cuda")
    prio = torch.randperm(4096, device="cuda")
    used = torch.rand(4096, device="cuda") > 0.1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = ds_moe.route(logits, k, capacity_slots=700, token_priority=prio, used_token=used,
                         router_z_loss_coef=1e-3)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert r.kept_counts.sum().item() <= 8 * 700


@pytest.mark.parametrize("fuse_logits", [None, True], ids=["default", "fused_gate"])
@pytest.mark.parametrize("k,dropless", [(1, False), (2, False), (2, True)])
def test_layer_forward_backward_never_syncs_with_the_host(k, dropless, fuse_logits):
    # ep_size 1 on the grouped kernel: routing, permutation, experts, combine and the whole
    # backward run without one device-to-host sync (RTS and drops included).
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("the grouped kernel (the sync-free expert path) needs sm90+")
    torch.manual_seed(0)
    d = 256
    mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    moe = ds_moe.MoE(
        d,
        mlp,
        num_experts=8,
        k=k,
        capacity_factor=1.0,
        drop_tokens=not dropless,
    )  # top-2 samples its second expert (Gumbel), as by default
    moe = moe.cuda().to(torch.bfloat16).train()
    moe.gate.fuse_logits = fuse_logits  # also the opt-in fused router logits
    x = torch.randn(2, 1000, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, l_aux, counts = moe(x)  # warm-up: the grouped-kernel probe syncs once per device
    (out.float().square().mean() + l_aux).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, l_aux, counts = moe(x)
        (out.float().square().mean() + l_aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts.device.type == "cuda" and int(counts.sum()) == 2000 * k
    assert (
        torch.isfinite(x.grad.float()).all() and torch.isfinite(moe.experts.w1.grad.float()).all()
    )


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("counting", [True, False], ids=["counting", "sorting"])
def test_routing_on_cuda_equals_0_1_3_and_never_syncs(monkeypatch, k, counting):
    # the counting-sort ranks (index_fill + 1-D cumsum) and the argsort fallback on CUDA
    # decide bitwise what 0.1.3's two sorts decided, without a host sync
    from routing_before import route_before

    import ds_moe._routing as routing_mod

    if not counting:
        monkeypatch.setattr(routing_mod, "_COUNTED_RANK_MAX", 0)
    g = torch.Generator(device="cuda").manual_seed(k)
    logits = torch.randn(16384, 8, device="cuda", generator=g) + torch.linspace(1.0, 0, 8).cuda()
    prio = torch.randperm(16384, device="cuda", generator=g)
    used = torch.rand(16384, device="cuda", generator=g) > 0.1
    for kw in ({"capacity_slots": 2560}, {"capacity_slots": 2000, "used_token": used},
               {"capacity_slots": None}):  # fmt: skip
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            new = ds_moe.route(logits, k, token_priority=prio, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        old = route_before(logits, k, token_priority=prio, **kw)
        for field in ("expert_index", "kept", "order", "kept_counts", "exp_counts"):
            assert torch.equal(getattr(new, field), getattr(old, field)), field
        assert torch.equal(
            new.combine_weight.view(torch.int32), old.combine_weight.view(torch.int32)
        )
        assert torch.equal(new.l_aux.view(torch.int32), old.l_aux.view(torch.int32))


# ----------------------------------------------------------------- fused bias + activation
def _triton_or_skip():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed: the experts keep the unfused bias + activation")


_FUSED_ACTS = {
    "relu": nn.ReLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_bias_act_probe_passes_on_this_gpu(dtype):
    # the probe falls back silently; here a kernel that does not compile or is wrong fails
    from ds_moe import _bias_act

    _triton_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    _bias_act._probe.cache_clear()
    for act in _FUSED_ACTS.values():
        code = _bias_act.activation_code(act)
        assert _bias_act._self_check(device, dtype, code), act
        with torch.inference_mode():  # a first forward in evaluation probes all the same
            assert _bias_act.fused_bias_act_available(device, dtype, code), act


@pytest.mark.parametrize("act", list(_FUSED_ACTS))
def test_fused_kernels_match_torch_on_cuda(act):
    # bf16, torch's CUDA kernels as the reference: the kernels use the same fp32 formulas and
    # libdevice (CUDA's) transcendental functions on the same rounded y + b, so outputs and
    # input gradients are equal but for rare last-bit differences; the bias gradient is an
    # fp32 sum in another order (1 bf16 ulp), and deterministic
    from ds_moe import _bias_act

    _triton_or_skip()
    torch.manual_seed(0)
    code = _bias_act.activation_code(_FUSED_ACTS[act])
    sizes = [700, 0, 1500, 33, 0, 1]
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    end, rows, cols = sum(sizes), sum(sizes) + 77, 1000  # ragged last column tile
    y = (torch.randn(rows, cols, device="cuda") * 2).to(torch.bfloat16)
    bias = torch.randn(len(sizes), cols, device="cuda").to(torch.bfloat16)
    dh = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    y[end:], dh[end:] = float("nan"), float("nan")
    h = torch.ops.ds_moe.bias_act(y, bias, offs, code)
    dz, db = torch.ops.ds_moe.bias_act_backward(dh, y, bias, offs, code)
    yr = y[:end].clone().requires_grad_()
    ref = _bias_act.reference(yr, bias, offs, _FUSED_ACTS[act])
    ref.backward(dh[:end])
    group = torch.searchsorted(
        offs, torch.arange(end, device="cuda", dtype=torch.int32), right=True
    )
    ref_db = torch.zeros(len(sizes), cols, device="cuda", dtype=torch.float64)
    ref_db.index_add_(0, group, yr.grad.double())
    tol = dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(h[:end], ref.detach(), **tol)
    torch.testing.assert_close(dz[:end], yr.grad, **tol)
    torch.testing.assert_close(db.double(), ref_db, **tol)
    # last-bit differences only: measured on an H100, exact GELU's erf differs from torch's
    # CUDA kernel in 0.79% of the bf16 outputs (within the tolerance above), the other
    # activations in under 0.1%
    share = 1e-2 if act == "gelu" else 1e-3
    assert (h[:end] != ref).float().mean().item() < share
    assert (dz[:end] != yr.grad).float().mean().item() < share
    assert torch.count_nonzero(db[1]) == 0 and torch.count_nonzero(db[4]) == 0
    dz2, db2 = torch.ops.ds_moe.bias_act_backward(dh, y, bias, offs, code)
    assert torch.equal(db2, db) and torch.equal(dz2[:end], dz[:end])


def _spy_fused(monkeypatch):
    import ds_moe._experts as experts_mod

    calls = []
    real = experts_mod.bias_act
    monkeypatch.setattr(experts_mod, "bias_act", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("act", list(_FUSED_ACTS))
@pytest.mark.parametrize("sizes", [[37, 0, 200, 5], [0, 0, 64, 0], [128, 128, 128, 128]])
def test_fused_experts_match_unfused_on_cuda(monkeypatch, act, sizes):
    _triton_or_skip()
    if not ds_moe.grouped_mm_available(
        torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    ):
        pytest.skip("the fused bias + activation runs on the grouped-GEMM path (sm90+)")
    calls = _spy_fused(monkeypatch)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 1024), _FUSED_ACTS[act], nn.Linear(1024, 256))
    fused = ds_moe.GroupedMLPExperts(mlp, 4).cuda().to(torch.bfloat16)
    fused.fuse_bias_act = True
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.05)
    unfused = ds_moe.GroupedMLPExperts(mlp, 4).cuda().to(torch.bfloat16)
    unfused.load_state_dict(fused.state_dict())
    unfused.fuse_bias_act = False
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    end = sum(sizes)
    x = torch.randn(end + 9, 256, device="cuda", dtype=torch.bfloat16)  # 9 dropped rows
    g = torch.randn_like(x)
    res = []
    for m in (fused, unfused):
        xi = x.clone().requires_grad_()
        y = m(xi, offs=offs)
        y[:end].backward(g[:end])
        res.append([y[:end], xi.grad[:end], *[p.grad for p in m.parameters()]])
    assert len(calls) == 1  # the fused path ran for `fused` only
    for a, b in zip(*res):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def test_fused_experts_never_sync_with_the_host(monkeypatch):
    _triton_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    if not ds_moe.grouped_mm_available(device, torch.bfloat16):
        pytest.skip("the fused bias + activation runs on the grouped-GEMM path (sm90+)")
    calls = _spy_fused(monkeypatch)
    mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    m = ds_moe.GroupedMLPExperts(mlp, 8).cuda().to(torch.bfloat16)
    m.fuse_bias_act = True
    offs = torch.tensor([100, 0, 300, 50, 50, 0, 200, 99], device="cuda").cumsum(0).int()
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m(x, offs=offs).sum().backward()  # warm-up: probes and kernel compilation sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x, offs=offs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2 and torch.isfinite(m.b1.grad.float()).all()


# ----------------------------------------------------------------- fused router logits
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_gate_probe_passes_on_this_gpu(dtype):
    # the probe falls back silently; here a kernel that does not compile or is wrong fails
    from ds_moe import _gate_linear

    _triton_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    _gate_linear._probe.cache_clear()
    assert _gate_linear._self_check(device, dtype)
    with torch.inference_mode():  # a first forward in evaluation probes all the same
        assert _gate_linear.fused_gate_available(device, dtype)


def test_fused_gate_matches_fp32_linear_at_benchmark_shape():
    # the benchmark's shape (16K tokens x 2048, 8 experts): logits to fp32 rounding, the
    # gradients to one bf16 ulp, the weight gradient deterministic; no host sync on the way
    from ds_moe import _gate_linear

    _triton_or_skip()
    torch.manual_seed(0)
    x = torch.randn(16384, 2048, device="cuda").to(torch.bfloat16)
    w = (torch.randn(8, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    up = torch.randn(16384, 8, device="cuda")
    grads = []
    for _ in range(2):
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = _gate_linear.gate_logits(xf, wf)
            out.backward(up)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        grads.append(wf.grad)
    assert torch.equal(grads[0], grads[1])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _gate_linear.reference(xr, wr)
    ref.backward(up)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=2.0**-7, atol=1e-6)
    torch.testing.assert_close(wf.grad, wr.grad, rtol=2.0**-7, atol=1e-3)


@pytest.mark.parametrize("k", [1, 2])
def test_fused_gate_routes_like_the_unfused_gate_on_cuda(k):
    from ds_moe._config import GateConfig
    from ds_moe._gate import TopKGate

    _triton_or_skip()
    torch.manual_seed(0)
    cfg = GateConfig(num_experts=8, k=k, use_rts=False, capacity_factor=1.25,
                     top2_2nd_expert_sampling=False)  # fmt: skip
    gate = TopKGate(1024, cfg).cuda().to(torch.bfloat16)
    x = torch.randn(4096, 1024, device="cuda").to(torch.bfloat16)
    runs = []
    for fuse in (True, False):
        gate.fuse_logits = fuse
        r = gate(x)
        runs.append(r)
    a, b = runs
    # a tie within the last fp32 bits may flip a choice; on random tokens there is none
    assert torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.order, b.order)
    torch.testing.assert_close(a.combine_weight, b.combine_weight, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- fused combine
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_combine_probe_passes_on_this_gpu(dtype):
    # the probe falls back silently; here a kernel that does not compile or is wrong fails
    from ds_moe import _combine

    _triton_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    for k in (1, 2, 3):
        diff = _combine.compare_with_unfused(device, dtype, k, num_tokens=1000, d=520)
        assert diff["bitwise_equal"] or k > 2, (k, diff)
        assert diff["max_rel"] <= 2.0**-7, (k, diff)
    _combine._probe.cache_clear()
    assert _combine.fused_combine_available(device, dtype)


@pytest.mark.parametrize("k", [1, 2])
def test_fused_combine_layer_matches_unfused_and_never_syncs(k):
    # the whole layer on the grouped path, default (fused combine) against fuse_combine=False,
    # same weights and routing (no RTS, no sampling): output, expert and token gradients equal;
    # the router's gradient (through the combine weights' gradient) to one bf16 ulp
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("the grouped kernel needs sm90+")
    _triton_or_skip()
    torch.manual_seed(0)
    d = 512
    mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    base = ds_moe.MoE(d, mlp, num_experts=8, k=k, capacity_factor=1.0, use_rts=False,
                      top2_2nd_expert_sampling=False).cuda().to(torch.bfloat16).train()  # fmt: skip
    x0 = torch.randn(4, 1000, d, device="cuda", dtype=torch.bfloat16)
    got = []
    for fused in (True, False):
        moe = copy.deepcopy(base)
        moe.fuse_combine = fused
        x = x0.clone().requires_grad_()
        out, l_aux, _ = moe(x)  # warm-up (probes, compilation)
        (out.float().square().mean() + l_aux).backward()
        moe.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, l_aux, _ = moe(x)
            (out.float().square().mean() + l_aux).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        got.append((out, moe.experts.w1.grad, moe.experts.w2.grad, moe.gate.wg.weight.grad, x.grad))
    (a, b) = got
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[3], b[3], rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(a[4], b[4], rtol=2**-7, atol=1e-6)


# ----------------------------------------------------------------- fused route placement
def test_fused_route_probe_passes_on_this_gpu():
    from ds_moe import _route_fused

    _triton_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    _route_fused._probe.cache_clear()
    assert _route_fused._self_check(device)
    assert _route_fused.fused_route_available(device)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("slots", [2560, None], ids=["capacity", "dropless"])
def test_fused_route_equals_torch_at_benchmark_shape_and_never_syncs(k, slots):
    # 16K tokens, 8 experts, RTS, skewed so capacity drops: every integer field equal, and
    # the fused routing issues no device-to-host sync
    from ds_moe import _route_fused

    _triton_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    assert _route_fused.compare_with_torch(device, 16384, 8, k, slots, True, skew=1.0)
    logits = torch.randn(16384, 8, device=device)
    prio = torch.randperm(16384, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = ds_moe.route(logits, k, capacity_slots=slots, token_priority=prio, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(r.kept_counts.sum()) == int(r.kept.sum())
