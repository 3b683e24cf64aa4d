"""FusedAdam / FusedLamb / FusedLion: the pure-torch path against torch.optim and reference
code, the Triton kernels against it (on CPU tensors under TRITON_INTERPRET=1 when there is no
GPU), and GPU tests marked `gpu`."""

from __future__ import annotations

import copy
import inspect
import math
import os

import pytest
import torch

import ds_kernels
from ds_kernels._fused_op import TorchFusedOptim

SHAPES = [(40, 33), (5000,), (1,)]  # 5000 > one 4096-element chunk
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return INTERPRET or torch.cuda.is_available()


needs_triton = pytest.mark.skipif(
    not triton_ok(), reason="needs Triton (GPU or TRITON_INTERPRET=1)"
)


def make_params(dtype=torch.float32, device="cpu", seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype))
        for s in shapes
    ]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grads_for(params, steps, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(p.shape, generator=g) * scale).to(device=p.device, dtype=p.dtype)
            for p in params
        ]
        for _ in range(steps)
    ]


def run(opt, params, grads_per_step, **step_kwargs):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step(**step_kwargs)


def assert_rel(actual, expected, rel=1e-6):
    for a, e in zip(actual, expected):
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        scale = float(e.abs().max().clamp_min(1e-12))
        assert float((a - e).abs().max()) <= rel * scale, float((a - e).abs().max()) / scale


def fallback(opt):
    opt._op = TorchFusedOptim()
    return opt


def reference_lamb(params, grads_per_step, lr, betas, eps, wd, max_coeff=10.0, min_coeff=0.01):
    """LAMB (You et al. 2019, Algorithm 2) with bias correction and DeepSpeed's clamp."""
    b1, b2 = betas
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for p, g, m, v in zip(params, grads, ms, vs):
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat = m / (1 - b1**step)
            v_hat = v / (1 - b2**step)
            r = m_hat / (v_hat.sqrt() + eps) + wd * p
            wn, rn = float(p.norm()), float(r.norm())
            trust = wn / rn if wn > 0 and rn > 0 else 1.0
            trust = min(max(trust, min_coeff), max_coeff)
            p.sub_(lr * trust * r)
    return params


def reference_lion(params, grads_per_step, lr, betas, wd):
    b1, b2 = betas
    ms = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, m in zip(params, grads, ms):
            c = b1 * m + (1 - b1) * g
            p.mul_(1 - lr * wd).add_(torch.sign(c), alpha=-lr)
            m.mul_(b2).add_((1 - b2) * g)
    return params


# --------------------------------------------------------------------------- pure-torch path
@pytest.mark.parametrize("adamw", [True, False])
def test_fallback_adam_matches_torch(adamw):
    ref_params = make_params()
    params = clone(ref_params)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = (torch.optim.AdamW if adamw else torch.optim.Adam)(ref_params, **kw)
    opt = fallback(ds_kernels.FusedAdam(params, adam_w_mode=adamw, **kw))
    steps = grads_for(params, 20)
    run(ref, ref_params, steps)
    run(opt, params, steps)
    assert_rel(params, ref_params)


def test_fallback_lamb_and_lion_match_references():
    steps = None
    for cls, kw, ref_fn in [
        (ds_kernels.FusedLamb, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
         lambda ps, st: reference_lamb(ps, st, 1e-2, (0.9, 0.999), 1e-6, 0.01)),
        (ds_kernels.FusedLion, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
         lambda ps, st: reference_lion(ps, st, 1e-3, (0.9, 0.99), 0.1)),
    ]:  # fmt: skip
        ref_params = [p.detach().clone() for p in make_params()]
        params = clone(ref_params)
        steps = grads_for(params, 20)
        run(fallback(cls(params, **kw)), params, steps)
        ref_fn(ref_params, steps)
        assert_rel(params, ref_params, rel=1e-5)


# --------------------------------------------------------------------------- Triton kernels
@needs_triton
@pytest.mark.parametrize(
    "cls, kw",
    [
        (ds_kernels.FusedAdam, dict(lr=1e-2, weight_decay=0.1)),
        (ds_kernels.FusedAdam, dict(lr=1e-2, weight_decay=0.1, adam_w_mode=False)),
        (ds_kernels.FusedLamb, dict(lr=1e-2, weight_decay=0.01)),
        (ds_kernels.FusedLion, dict(lr=1e-3, weight_decay=0.1)),
    ],
    ids=["adamw", "adam-l2", "lamb", "lion"],
)
def test_triton_matches_fallback_fp32(cls, kw):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = make_params(device=device)
    b = clone(a)
    steps = grads_for(a, 5, scale=8.0)
    opt = cls(a, **kw)
    assert opt.backend == "triton"
    run(opt, a, steps, grad_scale=8.0)  # inline unscale
    run(fallback(cls(b, **kw)), b, steps, grad_scale=8.0)
    assert_rel(a, b, rel=1e-6 if cls is not ds_kernels.FusedLamb else 1e-5)


@needs_triton
@pytest.mark.parametrize("cls", [ds_kernels.FusedAdam, ds_kernels.FusedLamb, ds_kernels.FusedLion])
def test_triton_bf16_params_with_fp32_master(cls):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = make_params(dtype=torch.bfloat16, device=device)
    b = clone(a)
    steps = grads_for(a, 4)
    opt = cls(a, lr=1e-3, master_weights=True)
    ref = fallback(cls(b, lr=1e-3, master_weights=True))
    run(opt, a, steps)
    run(ref, b, steps)
    masters = [opt.state[p]["master_param"] for p in a]
    assert all(m.dtype == torch.float32 for m in masters)
    assert_rel(masters, [ref.state[p]["master_param"] for p in b], rel=1e-5)
    for p, m in zip(a, masters):
        # The bf16 param is the master rounded in the same pass (the interpreter truncates
        # instead of rounding to nearest, so allow one bf16 ulp there).
        ulp = 2.0 ** (torch.floor(torch.log2(m.abs().clamp_min(1e-30))) - 7)
        err = (p.float() - m).abs()
        assert bool((err <= (ulp if INTERPRET else ulp / 2)).all())


@needs_triton
def test_found_inf_skips_the_step_and_check_finite_sets_the_flag():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = make_params(device=device)
    opt = ds_kernels.FusedAdam(params, lr=1e-2, check_finite=True)
    run(opt, params, grads_for(params, 2))
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    bad = grads_for(params, 1, seed=5)
    bad[0][1][17] = math.inf
    run(opt, params, bad)
    assert float(opt.found_inf) == 1.0
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
    for k, st in opt.state_dict()["state"].items():
        assert float(st["step"]) == float(state_before[k]["step"]) == 2.0
        assert torch.equal(st["exp_avg"], state_before[k]["exp_avg"])
    run(opt, params, grads_for(params, 1, seed=6))
    assert float(opt.found_inf) == 0.0
    assert float(opt.state[params[0]]["step"]) == 3.0
    # An external flag (e.g. from a loss scaler) skips without the check.
    opt2 = ds_kernels.FusedLion(params, lr=1e-3)
    snap = [p.detach().clone() for p in params]
    run(opt2, params, grads_for(params, 1), found_inf=torch.ones(1, device=device))
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, snap))


@needs_triton
def test_state_dict_moves_between_fused_adam_and_torch_adamw():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(lr=1e-2, weight_decay=0.1)
    params = make_params(device=device)
    opt = ds_kernels.FusedAdam(params, **kw)
    run(opt, params, grads_for(params, 3))
    ref_params = clone(params)
    ref = torch.optim.AdamW(ref_params, **kw)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    more = grads_for(params, 3, seed=9)
    run(opt, params, more)
    run(ref, ref_params, more)
    assert_rel(params, ref_params)
    back_params = clone(ref_params)
    back = ds_kernels.FusedAdam(back_params, **kw)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    run(back, back_params, grads_for(params, 2, seed=11))
    run(ref, ref_params, grads_for(params, 2, seed=11))
    assert_rel(back_params, ref_params)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="amsgrad"):
        ds_kernels.FusedAdam(make_params(), amsgrad=True)
    with pytest.raises(ValueError, match="weight_decay"):
        ds_kernels.FusedLion(make_params(), weight_decay=-1.0)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ds_kernels.FusedAdam([p]).step()


# DeepSpeed 0.19's constructors (ops/adam/fused_adam.py, ops/lamb/fused_lamb.py,
# ops/lion/fused_lion.py), after the params: names, defaults and positional order.
DEEPSPEED_POSITIONAL = {
    ds_kernels.FusedAdam: [
        ("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)), ("eps", 1e-8),
        ("adam_w_mode", True), ("weight_decay", 0.0), ("amsgrad", False),
        ("set_grad_none", True),
    ],
    ds_kernels.FusedLamb: [
        ("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)), ("eps", 1e-8),
        ("eps_inside_sqrt", False), ("weight_decay", 0.0), ("max_grad_norm", 0.0),
        ("max_coeff", 10.0), ("min_coeff", 0.01), ("amsgrad", False),
    ],
    ds_kernels.FusedLion: [
        ("lr", 1e-3), ("betas", (0.9, 0.999)), ("weight_decay", 0.0), ("set_grad_none", True),
    ],
}  # fmt: skip


def test_constructors_take_deepspeeds_names_defaults_and_order():
    for cls, expected in DEEPSPEED_POSITIONAL.items():
        sig = inspect.signature(cls)
        positional = [p for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [(p.name, p.default) for p in positional[1:]] == expected, cls.__name__


def test_deepspeed_positional_calls_give_the_same_steps():
    steps = grads_for(make_params(), 3)
    for cls, ds_args, kw in [
        # FusedAdam(params, lr, bias_correction, betas, eps, adam_w_mode, weight_decay, amsgrad,
        # set_grad_none)
        (ds_kernels.FusedAdam, (1e-2, True, (0.9, 0.99), 1e-8, False, 0.1, False, True),
         dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, adam_w_mode=False)),
        # FusedLamb(params, lr, bias_correction, betas, eps, eps_inside_sqrt, weight_decay,
        # max_grad_norm, max_coeff, min_coeff, amsgrad)
        (ds_kernels.FusedLamb, (1e-2, True, (0.9, 0.99), 1e-6, False, 0.01, 0.0, 5.0, 0.1, False),
         dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, max_coeff=5.0,
              min_coeff=0.1)),
        (ds_kernels.FusedLion, (1e-3, (0.9, 0.99), 0.1, True),
         dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    ]:  # fmt: skip
        a, b = make_params(), make_params()
        run(fallback(cls(a, *ds_args)), a, steps)
        run(fallback(cls(b, **kw)), b, steps)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), cls.__name__


def test_unsupported_deepspeed_options_are_errors_not_ignored():
    params = make_params()
    for cls in (ds_kernels.FusedAdam, ds_kernels.FusedLamb):
        with pytest.raises(ValueError, match="amsgrad=True"):
            cls(params, amsgrad=True)
    with pytest.raises(ValueError, match="eps_inside_sqrt"):
        ds_kernels.FusedLamb(params, eps_inside_sqrt=True)
    with pytest.raises(ValueError, match="gradient_clipping"):
        ds_kernels.FusedLamb(params, max_grad_norm=1.0)
    # torch.optim's positional order against DeepSpeed's: betas where bias_correction goes.
    with pytest.raises(TypeError, match="bias_correction must be True or False"):
        ds_kernels.FusedAdam(params, 1e-3, (0.9, 0.999))
    with pytest.raises(TypeError, match="invalid betas"):
        ds_kernels.FusedLion(params, 1e-3, 0.9)


def test_set_grad_none_decides_what_zero_grad_does():
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    keep = ds_kernels.FusedAdam(params, set_grad_none=False)
    grads = [p.grad for p in params]
    keep.zero_grad()
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    keep.zero_grad(set_to_none=True)  # an explicit argument wins
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    ds_kernels.FusedLion(params).zero_grad()  # default True, as in DeepSpeed
    assert all(p.grad is None for p in params)


# --------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_fused_adam_matches_torch_fused_adamw_many_tensors():
    g = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(1, 70_000, (200,), generator=g)]
    params = make_params(device="cuda", shapes=shapes)
    ref_params = clone(params)
    kw = dict(lr=1e-3, weight_decay=0.01)
    opt = ds_kernels.FusedAdam(params, **kw)
    ref = torch.optim.AdamW(ref_params, fused=True, **kw)
    steps = grads_for(params, 10)
    run(opt, params, steps)
    run(ref, ref_params, steps)
    assert opt.backend == "triton"
    assert_rel(params, ref_params, rel=1e-5)


@pytest.mark.gpu
def test_gpu_bf16_direct_update_close_to_fallback():
    a = make_params(dtype=torch.bfloat16, device="cuda")
    b = clone(a)
    steps = grads_for(a, 3)
    run(ds_kernels.FusedAdam(a, lr=1e-3), a, steps)
    run(fallback(ds_kernels.FusedAdam(b, lr=1e-3)), b, steps)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-2, atol=1e-2)


@needs_triton
def test_reused_addresses_with_new_sizes_get_a_new_chunk_table():
    """A layout is cached by tensor addresses; memory reused by tensors of other sizes must
    not hit a stale table (it would update the wrong number of elements)."""
    from ds_kernels._ops import load

    op = load("fused_optim")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bufs = [torch.zeros(6000, device=device) for _ in range(4)]
    for n in (5000, 2000, 6000):  # same base addresses, different sizes
        for b in bufs:
            b.zero_()
        p, g, m, v = (b[:n] for b in bufs)
        g.fill_(1.0)
        step = [torch.ones((), device=device)]
        op.lion([p], [g], [m], None, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0)
        assert torch.equal(p, torch.full((n,), -0.5, device=device)), n
        op.adam([p], [g], [m], [v], None, step, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled=True, bias_correction=True)  # fmt: skip
        assert bool((p < -0.5).all()), n
        assert not bool(bufs[0][n:].any()), f"elements past {n} were written"
