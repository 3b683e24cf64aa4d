"""CPUAdam / CPUAdagrad / CPULion against torch.optim and reference code, compiled and fallback."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import ds_kernels
from ds_kernels._cpu_optim_op import TorchCpuOptim

SHAPES = [(64, 33), (16385,), (1,), (7, 3, 5)]  # 16385 crosses a 16K-element chunk boundary


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def run_steps(opt, params, steps: int, seed: int = 1, **step_kwargs):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(**step_kwargs)


def assert_rel(actual, expected, rel=1e-6):
    """Within `rel` relative to the tensor's scale (elements near zero get the same absolute
    slack as the largest), and elementwise within 1e-5 relative."""
    for a, e in zip(actual, expected):
        a, e = a.detach(), e.detach()
        scale = e.abs().max().clamp_min(1e-12)
        assert (a - e).abs().max() <= rel * scale, float((a - e).abs().max() / scale)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=rel * float(scale))


@pytest.fixture(params=["compiled", "fallback"])
def backend(request, cpu_op):
    return request.param


def with_backend(opt, backend):
    if backend == "fallback":
        opt._op = TorchCpuOptim()
    else:
        assert opt.backend in ("jit", "cached", "prebuilt")
    return opt


@pytest.mark.parametrize("adamw", [True, False])
def test_adam_matches_torch(backend, adamw):
    ref_params = make_params()
    params = clone(ref_params)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = (torch.optim.AdamW if adamw else torch.optim.Adam)(ref_params, **kw)
    opt = with_backend(ds_kernels.CPUAdam(params, adamw_mode=adamw, **kw), backend)
    run_steps(ref, ref_params, 20)
    run_steps(opt, params, 20)
    assert_rel(params, ref_params)
    for p, q in zip(params, ref_params):
        assert_rel([opt.state[p]["exp_avg_sq"]], [ref.state[q]["exp_avg_sq"]])
        assert float(opt.state[p]["step"]) == 20.0


def test_adagrad_matches_torch(backend):
    ref_params = make_params()
    params = clone(ref_params)
    kw = dict(lr=5e-2, lr_decay=1e-2, weight_decay=0.05, initial_accumulator_value=0.1, eps=1e-10)
    ref = torch.optim.Adagrad(ref_params, **kw)
    opt = with_backend(ds_kernels.CPUAdagrad(params, **kw), backend)
    run_steps(ref, ref_params, 20)
    run_steps(opt, params, 20)
    assert_rel(params, ref_params)


def reference_lion(params, grads_per_step, lr, betas, wd):
    """Lion as written in the paper (Chen et al. 2023, Algorithm 2), plain torch."""
    beta1, beta2 = betas
    ms = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, m in zip(params, grads, ms):
            c = beta1 * m + (1 - beta1) * g
            p.mul_(1 - lr * wd).add_(torch.sign(c), alpha=-lr)
            m.mul_(beta2).add_((1 - beta2) * g)
    return params


def test_lion_matches_reference(backend):
    ref_params = [p.detach().clone() for p in make_params()]
    params = clone(ref_params)
    opt = with_backend(
        ds_kernels.CPULion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), backend
    )
    g = torch.Generator().manual_seed(1)
    grads_per_step = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(20)]
    for grads in grads_per_step:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    reference_lion(ref_params, grads_per_step, 1e-3, (0.9, 0.99), 0.1)
    assert_rel(params, ref_params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [ds_kernels.CPUAdam, ds_kernels.CPUAdagrad, ds_kernels.CPULion])
def test_low_precision_copy_in_same_pass(backend, dtype, cls):
    params = make_params()
    opt = with_backend(cls(params, lr=1e-2), backend)
    outs = [torch.empty(p.shape, dtype=dtype) for p in params]
    run_steps(opt, params, 3, low_precision_out=[outs])
    for p, o in zip(params, outs):
        # Round-to-nearest-even, bit-identical to torch's conversion.
        assert torch.equal(o, p.detach().to(dtype))


def test_groups_hparams_and_params_without_grad(backend):
    ref_params = make_params()
    params = clone(ref_params)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 1e-2, "weight_decay": 0.0},
            {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.2, "betas": (0.8, 0.95)},
        ]

    ref = torch.optim.AdamW(groups(ref_params), eps=1e-8)
    opt = with_backend(ds_kernels.CPUAdam(groups(params), eps=1e-8), backend)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(params, ref_params):
            gr = torch.randn(p.shape, generator=g)
            p.grad, q.grad = gr.clone(), gr.clone()
        params[1].grad = ref_params[1].grad = None  # frozen this step
        opt.step()
        ref.step()
    assert_rel(params, ref_params)


def test_thread_count_does_not_change_results(cpu_op):
    a, b = make_params(), make_params()
    run_steps(ds_kernels.CPUAdam(a, lr=1e-2, num_threads=1), a, 3)
    run_steps(ds_kernels.CPUAdam(b, lr=1e-2, num_threads=2), b, 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0])
def test_adam_grad_scale_is_the_step_on_the_scaled_gradient(backend, cpu_op, adamw, scale):
    """op.adam(grad_scale=s) on g is op.adam on g * s (bitwise: the compiled op rounds s to
    float once, as torch's mul_ does), and the caller's gradients are left as they were."""
    op = cpu_op if backend == "compiled" else TorchCpuOptim()
    gen = torch.Generator().manual_seed(3)
    p0 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    kept = [g.clone() for g in grads]

    def step(params, gs, grad_scale):
        m = [torch.zeros_like(t) for t in params]
        v = [torch.zeros_like(t) for t in params]
        out = [torch.empty_like(t, dtype=torch.bfloat16) for t in params]
        op.adam(params, gs, m, v, out, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.1, decoupled=adamw, bias_correction1=[0.1] * len(params),
                bias_correction2_sqrt=[0.0316] * len(params), grad_scale=grad_scale)  # fmt: skip
        return params, m, v, out

    got = step([t.clone() for t in p0], grads, scale)
    want = step([t.clone() for t in p0], [g.mul(scale) for g in kept], 1.0)
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for g, k in zip(grads, kept):
        assert torch.equal(g, k)


def test_bias_correction_off_matches_fallback(cpu_op):
    a, b = make_params(), make_params()
    run_steps(ds_kernels.CPUAdam(a, lr=1e-2, bias_correction=False), a, 5)
    run_steps(with_backend(ds_kernels.CPUAdam(b, lr=1e-2, bias_correction=False), "fallback"), b, 5)
    assert_rel(a, b)


def test_state_dict_round_trip_with_torch_adamw(cpu_op):
    kw = dict(lr=1e-2, weight_decay=0.1)
    # CPUAdam -> torch AdamW
    params = make_params()
    opt = ds_kernels.CPUAdam(params, **kw)
    run_steps(opt, params, 5)
    ref_params = clone(params)
    ref = torch.optim.AdamW(ref_params, **kw)
    # deepcopy: torch's load_state_dict keeps (shares) tensors whose dtype/device match.
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_steps(opt, params, 5, seed=7)
    run_steps(ref, ref_params, 5, seed=7)
    assert_rel(params, ref_params)
    # torch AdamW -> CPUAdam
    back_params = clone(ref_params)
    back = ds_kernels.CPUAdam(back_params, **kw)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    run_steps(ref, ref_params, 5, seed=9)
    run_steps(back, back_params, 5, seed=9)
    assert_rel(back_params, ref_params)
    assert float(back.state[back_params[0]]["step"]) == 15.0


def test_state_dict_round_trip_with_torch_adagrad(cpu_op):
    params = make_params()
    opt = ds_kernels.CPUAdagrad(params, lr=1e-2)
    run_steps(opt, params, 3)
    ref_params = clone(params)
    ref = torch.optim.Adagrad(ref_params, lr=1e-2)
    # deepcopy: torch's load_state_dict keeps (shares) tensors whose dtype/device match.
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_steps(opt, params, 3, seed=5)
    run_steps(ref, ref_params, 3, seed=5)
    assert_rel(params, ref_params)


def test_bad_input_errors(cpu_op):
    half = torch.nn.Parameter(torch.randn(4).half())
    half.grad = torch.randn(4).half()
    with pytest.raises(ValueError, match="fp32 CPU params"):
        ds_kernels.CPUAdam([half]).step()
    with pytest.raises(ValueError, match="amsgrad"):
        ds_kernels.CPUAdam(make_params(), amsgrad=True)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        ds_kernels.CPUAdam(make_params(), betas=(0.9, 1.0))
    params = make_params()
    opt = ds_kernels.CPUAdam(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="one buffer per param"):
        opt.step(low_precision_out=[[torch.empty(1, dtype=torch.bfloat16)]])
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        opt.step(low_precision_out=[[torch.empty(p.shape, dtype=torch.float64) for p in params]])
    with pytest.raises(ValueError, match="elements"):
        opt.step(low_precision_out=[[torch.empty(3, dtype=torch.bfloat16) for _ in params]])
    # A state dict from torch with amsgrad cannot silently run without it.
    ref = torch.optim.AdamW(clone(params), amsgrad=True)
    opt.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="amsgrad=True"):
        opt.step()


# DeepSpeed 0.19's constructors (ops/adam/cpu_adam.py, ops/lion/cpu_lion.py), after the params:
# names, defaults and positional order.
DEEPSPEED_POSITIONAL = {
    ds_kernels.CPUAdam: [
        ("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)), ("eps", 1e-8),
        ("weight_decay", 0), ("amsgrad", False), ("adamw_mode", True),
        ("fp32_optimizer_states", True),
    ],
    ds_kernels.CPULion: [
        ("lr", 1e-3), ("betas", (0.9, 0.999)), ("weight_decay", 0),
        ("fp32_optimizer_states", True),
    ],
}  # fmt: skip
# ops/adagrad/cpu_adagrad.py; after lr these are keyword-only here (see CPUAdagrad's docstring).
DEEPSPEED_ADAGRAD = {
    "eps": 1e-10,
    "weight_decay": 0,
    "amsgrad": False,
    "fp32_optimizer_states": True,
}


def test_constructors_take_deepspeeds_names_defaults_and_order():
    for cls, expected in DEEPSPEED_POSITIONAL.items():
        sig = inspect.signature(cls)
        positional = [p for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [(p.name, p.default) for p in positional[1:]] == expected, cls.__name__
    sig = inspect.signature(ds_kernels.CPUAdagrad).parameters
    assert sig["lr"].default == 1e-2
    assert {k: sig[k].default for k in DEEPSPEED_ADAGRAD} == DEEPSPEED_ADAGRAD


def test_deepspeed_style_calls_give_the_same_steps(cpu_op):
    a, b = make_params(), make_params()
    # DeepSpeedCPUAdam(model_params, lr, bias_correction, betas, eps, weight_decay, amsgrad,
    # adamw_mode, fp32_optimizer_states), all positional.
    run_steps(ds_kernels.CPUAdam(a, 1e-2, True, (0.9, 0.99), 1e-8, 0.1, False, False, True), a, 3)
    run_steps(ds_kernels.CPUAdam(b, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, adamw_mode=False), b, 3)  # fmt: skip
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    a, b = make_params(), make_params()
    run_steps(ds_kernels.CPULion(a, 1e-3, (0.9, 0.99), 0.1, True), a, 3)
    run_steps(ds_kernels.CPULion(b, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ref_params = make_params()
    params = clone(ref_params)
    ds_kw = dict(lr=5e-2, eps=1e-10, weight_decay=0.05, amsgrad=False, fp32_optimizer_states=True)
    run_steps(ds_kernels.CPUAdagrad(params, **ds_kw), params, 3)
    run_steps(torch.optim.Adagrad(ref_params, lr=5e-2, eps=1e-10, weight_decay=0.05), ref_params, 3)
    assert_rel(params, ref_params)


def test_unsupported_or_misplaced_arguments_are_errors():
    params = make_params()
    # amsgrad=True is refused, never ignored (DeepSpeedCPUAdagrad ignores it).
    for cls in (ds_kernels.CPUAdam, ds_kernels.CPUAdagrad):
        with pytest.raises(ValueError, match="amsgrad=True"):
            cls(params, amsgrad=True)
    # torch.optim's positional order against DeepSpeed's: betas where bias_correction goes.
    with pytest.raises(TypeError, match="bias_correction must be True or False"):
        ds_kernels.CPUAdam(params, 1e-3, (0.9, 0.999), 1e-8)
    with pytest.raises(TypeError, match="invalid betas: 0.9"):
        ds_kernels.CPULion(params, 1e-3, 0.9)
    with pytest.raises(TypeError, match="positional"):
        ds_kernels.CPUAdagrad(params, 1e-2, 1e-10)  # eps (DeepSpeed) or lr_decay (torch)?


# Sizes around the widening block (2048) and the thread chunk (16384), odd tails included.
LOW_GRAD_SHAPES = [(2047,), (2049,), (16384 + 2048 + 3,), (64, 33), (1,)]


def set_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Give the fp32 param `p` a gradient of another dtype, as a device's bf16 backward or a
    copy into a 16-bit host buffer does."""
    if hasattr(p, "grad_dtype"):  # torch >= 2.9 checks the gradient's dtype on assignment
        p.grad_dtype = grad.dtype
        p.grad = grad
    else:
        p.grad = torch.zeros_like(p)
        p.grad.data = grad


class GradDtypeSpy:
    """Wraps an op and records the dtypes of the gradients of its last call."""

    def __init__(self, op) -> None:
        self.op = op
        self.seen: list[torch.dtype] = []

    def __getattr__(self, name):
        fn = getattr(self.op, name)

        def call(params, grads, *args, **kwargs):
            self.seen = [g.dtype for g in grads]
            return fn(params, grads, *args, **kwargs)

        return call


OPTIMIZERS = {
    "adamw": lambda ps: ds_kernels.CPUAdam(ps, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda ps: ds_kernels.CPUAdam(ps, lr=1e-2, weight_decay=0.1, adamw_mode=False),
    "adam_no_bc": lambda ps: ds_kernels.CPUAdam(ps, lr=1e-2, bias_correction=False),
    "adagrad": lambda ps: ds_kernels.CPUAdagrad(ps, lr=1e-2, lr_decay=1e-3, weight_decay=0.1),
    "lion": lambda ps: ds_kernels.CPULion(ps, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_low_precision_grads_step_exactly_as_upcast_grads(backend, name, grad_dtype, out_dtype):
    """16-bit gradients read directly give bit for bit the step on `grad.float()` (what the
    optimizers did before reading them directly): params, states and the low-precision copy.
    Each param group mixes fp32 and 16-bit gradients; a few values are fp16/bf16 subnormals,
    infinities are left out (they make the update NaN, which torch.equal does not compare)."""
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=gen) for s in LOW_GRAD_SHAPES]
    direct = [torch.nn.Parameter(t.clone()) for t in init]
    upcast = [torch.nn.Parameter(t.clone()) for t in init]
    opt_d = with_backend(OPTIMIZERS[name](direct), backend)
    opt_u = with_backend(OPTIMIZERS[name](upcast), backend)
    opt_d._op = GradDtypeSpy(opt_d._op)
    outs = None
    if out_dtype is not None:
        outs = [[torch.empty(s, dtype=out_dtype) for s in LOW_GRAD_SHAPES] for _ in range(2)]
    for _ in range(4):
        for j, (p, q) in enumerate(zip(direct, upcast)):
            g = torch.randn(p.shape, generator=gen)
            head = torch.tensor([1e-7, -3e-8, 0.0])[: g.numel()]  # fp16 subnormals, zero
            g.view(-1)[: head.numel()] = head
            g = g * 0.01 if j % 2 else g
            if j == 3:  # this one stays fp32: a group may mix gradient dtypes
                p.grad, q.grad = g.clone(), g.clone()
            else:
                low = g.to(grad_dtype)
                set_grad(p, low)
                q.grad = low.float()
        opt_d.step(low_precision_out=None if outs is None else [outs[0]])
        opt_u.step(low_precision_out=None if outs is None else [outs[1]])
        assert direct[0].grad.dtype == grad_dtype  # the caller's gradient was not replaced
    # the op got the 16-bit gradients themselves, not upcast copies
    assert opt_d._op.seen == [grad_dtype] * 3 + [torch.float32] + [grad_dtype]
    for p, q in zip(direct, upcast):
        assert torch.equal(p.detach(), q.detach())
        for key, value in opt_d.state[p].items():
            assert torch.equal(value, opt_u.state[q][key]), key
    if outs is not None:
        for a, b in zip(*outs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_op_low_precision_grads_with_grad_scale_and_threads(cpu_op, grad_dtype):
    """The compiled op on 16-bit gradients equals the fallback on the widened ones (the
    reference written as torch.optim's ops), with grad_scale and 1 or 2 threads; the
    gradients themselves are left as they were."""
    gen = torch.Generator().manual_seed(5)
    p0 = [torch.randn(s, generator=gen) for s in LOW_GRAD_SHAPES]
    grads = [torch.randn(s, generator=gen).to(grad_dtype) for s in LOW_GRAD_SHAPES]
    kept = [g.clone() for g in grads]

    def step(op, gs, threads):
        params = [t.clone() for t in p0]
        m = [torch.zeros_like(t) for t in params]
        v = [torch.zeros_like(t) for t in params]
        out = [torch.empty_like(t, dtype=torch.bfloat16) for t in params]
        op.adam(params, gs, m, v, out, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.1, decoupled=True, bias_correction1=[0.1] * len(params),
                bias_correction2_sqrt=[0.0316] * len(params), grad_scale=0.37,
                num_threads=threads)  # fmt: skip
        return params, m, v, out

    one = step(cpu_op, grads, 1)
    two = step(cpu_op, grads, 2)
    upcast = step(cpu_op, [g.float() for g in grads], 2)
    ref = step(TorchCpuOptim(), grads, 0)
    for a, b, c, r in zip(one, two, upcast, ref):
        for w, x, y, z in zip(a, b, c, r):
            assert torch.equal(w, x) and torch.equal(x, y)
            torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
    for g, k in zip(grads, kept):
        assert torch.equal(g, k)


def test_op_rejects_other_gradient_dtypes(cpu_op):
    p = [torch.zeros(4)]
    for op in (cpu_op, TorchCpuOptim()):
        with pytest.raises(ValueError, match=r"grads\[0\] is torch.float64"):
            op.lion(p, [torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)], None,
                    lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)  # fmt: skip
