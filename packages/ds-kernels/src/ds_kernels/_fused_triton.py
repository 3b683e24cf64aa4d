"""Triton multi-tensor kernels for FusedAdam, FusedLamb, FusedLion (imported only when used).

One launch covers every tensor of a bucket (same device and dtypes): the host builds, once
per tensor layout, tables of data pointers and a chunk table (program id -> tensor, offset);
each program loads its tensor's pointers from the tables and sweeps CHUNK = BLOCK * ITERS
elements. Per-tensor scalars (bias corrections, LAMB norms) live in small device vectors, so
nothing is read back to the host and a step never synchronises.

Memory traffic per element is the minimum: Adam/fp32 reads p, g, m, v and writes p, m, v
(28 bytes). With `found_inf` every load and store is masked off when the flag is set, so a
skipped step reads and writes nothing (beyond the flag).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS
NUM_WARPS = 8  # measured best of 8 configurations on an H200 (fused_adam_bench --sweep)

_TL_DTYPES = {"float32": tl.float32, "bfloat16": tl.bfloat16, "float16": tl.float16}


def tl_dtype(torch_dtype) -> tl.dtype:
    return _TL_DTYPES[str(torch_dtype).replace("torch.", "")]


@triton.jit
def _live_limit(numel, found_inf_ptr, HAS_INF: tl.constexpr):
    # With a set inf/nan flag the limit is 0: every masked access is skipped.
    limit = numel
    if HAS_INF:
        limit = numel * (tl.load(found_inf_ptr) == 0).to(tl.int64)
    return limit


@triton.jit
def _adam_kernel(
    p_tab, g_tab, m_tab, v_tab, w_tab, numel_tab, chunk_tensor, chunk_start,
    neg_step_tab, bc2s_tab, decay, w1, beta2, one_minus_b2, eps, weight_decay,
    grad_scale_ptr, found_inf_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, HAS_MASTER: tl.constexpr, DECOUPLED: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    limit = _live_limit(tl.load(numel_tab + t), found_inf_ptr, HAS_INF)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
    neg_step = tl.load(neg_step_tab + t)
    bc2s = tl.load(bc2s_tab + t)
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < limit
        if HAS_MASTER:
            w_ptr = tl.load(w_tab + t).to(tl.pointer_type(tl.float32))
            w = tl.load(w_ptr + offs, mask=mask)
        else:
            w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        if DECOUPLED:
            w = w * decay
        else:
            g = g + weight_decay * w
        # torch.lerp's two-sided formula, as torch.optim uses for exp_avg.
        m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
        v = v * beta2 + one_minus_b2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2s) + eps
        w = w + neg_step * tl.div_rn(m, denom)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_MASTER:
            tl.store(w_ptr + offs, w, mask=mask)
        tl.store(p_ptr + offs, w.to(P_DT), mask=mask)


@triton.jit
def _lamb_phase1(
    p_tab, g_tab, m_tab, v_tab, w_tab, numel_tab, chunk_tensor, chunk_start,
    bc1_tab, bc2_tab, norms, beta1, beta2, eps, weight_decay, grad_scale_ptr, found_inf_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    """Moments, then per-tensor sum of squares of the weights and of the update."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    limit = _live_limit(tl.load(numel_tab + t), found_inf_ptr, HAS_INF)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
    bc1 = tl.load(bc1_tab + t)
    bc2 = tl.load(bc2_tab + t)
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)
    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    u_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < limit
        if HAS_MASTER:
            w_ptr = tl.load(w_tab + t).to(tl.pointer_type(tl.float32))
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        m = m * beta1 + (1.0 - beta1) * g
        v = v * beta2 + (1.0 - beta2) * g * g
        u = tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps) + weight_decay * w
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        w_sq += tl.where(mask, w * w, 0.0)
        u_sq += tl.where(mask, u * u, 0.0)
    tl.atomic_add(norms + 2 * t, tl.sum(w_sq, axis=0))
    tl.atomic_add(norms + 2 * t + 1, tl.sum(u_sq, axis=0))


@triton.jit
def _lamb_phase2(
    p_tab, m_tab, v_tab, w_tab, numel_tab, chunk_tensor, chunk_start,
    bc1_tab, bc2_tab, norms, lr, eps, weight_decay, max_coeff, min_coeff, found_inf_ptr,
    P_DT: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    """Recompute the update from the new moments and apply it with the trust ratio."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    limit = _live_limit(tl.load(numel_tab + t), found_inf_ptr, HAS_INF)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DT))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
    bc1 = tl.load(bc1_tab + t)
    bc2 = tl.load(bc2_tab + t)
    w_norm = tl.sqrt_rn(tl.load(norms + 2 * t))
    u_norm = tl.sqrt_rn(tl.load(norms + 2 * t + 1))
    ratio = tl.where((w_norm > 0) & (u_norm > 0), tl.div_rn(w_norm, u_norm), 1.0)
    ratio = tl.minimum(tl.maximum(ratio, min_coeff), max_coeff)
    neg_lr_ratio = -lr * ratio
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < limit
        if HAS_MASTER:
            w_ptr = tl.load(w_tab + t).to(tl.pointer_type(tl.float32))
            w = tl.load(w_ptr + offs, mask=mask)
        else:
            w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        u = tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps) + weight_decay * w
        w = w + neg_lr_ratio * u
        if HAS_MASTER:
            tl.store(w_ptr + offs, w, mask=mask)
        tl.store(p_ptr + offs, w.to(P_DT), mask=mask)


@triton.jit
def _lion_kernel(
    p_tab, g_tab, m_tab, w_tab, numel_tab, chunk_tensor, chunk_start,
    decay, neg_lr, beta1, beta2, grad_scale_ptr, found_inf_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    limit = _live_limit(tl.load(numel_tab + t), found_inf_ptr, HAS_INF)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < limit
        if HAS_MASTER:
            w_ptr = tl.load(w_tab + t).to(tl.pointer_type(tl.float32))
            w = tl.load(w_ptr + offs, mask=mask)
        else:
            w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        c = m * beta1 + g * (1.0 - beta1)
        sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        w = w * decay + neg_lr * sign
        m = m * beta2 + g * (1.0 - beta2)
        tl.store(m_ptr + offs, m, mask=mask)
        if HAS_MASTER:
            tl.store(w_ptr + offs, w, mask=mask)
        tl.store(p_ptr + offs, w.to(P_DT), mask=mask)


@triton.jit
def _nonfinite_kernel(
    g_tab, numel_tab, chunk_tensor, chunk_start, grad_scale_ptr, found_inf_ptr,
    G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    """Sets *found_inf_ptr to 1.0 if any (unscaled) gradient is inf or nan."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    numel = tl.load(numel_tab + t)
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DT))
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(grad_scale_ptr))
        bad = tl.maximum(bad, ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32))
    if tl.max(bad, axis=0) > 0:
        tl.atomic_max(found_inf_ptr, 1.0)
