"""Triton kernels of the router's capacity and placement (see ``_route_fused``).

Given each assignment's expert (``a = choice * S + token``, read from the [S, k] top-k indices)
and its priority (``choice * S + token_rank``, or ``a`` itself without RTS), three kernels
compute what ``_routing.route`` computes with ~25 small torch ops:

- by-priority (only with a priority): ``a_at[priority(a)] = a``, the assignments in priority
  order (a scatter: the priorities are a permutation of ``0..n-1``);
- histogram: per chunk of ``CHUNK`` priorities, the assignments per expert;
- place: per chunk, each assignment's slot in its expert (assignments of that expert in
  earlier chunks, from the histograms, plus a running count inside the chunk), whether the
  slot is under the capacity, and its position in the dispatch order (kept ones first by
  expert, then the dropped ones by expert, each in priority order); it writes ``position``,
  ``order`` (its inverse), ``kept`` and, in the first program, the per-expert counts; and
  the one-rank layout of ``_local_dispatch`` (each choice's buffer row ``dest`` and, 0 when
  dropped, ``row``; the token of every buffer row; the groups' ends ``offs``), which would
  otherwise take ~8 more small kernels.

Integers only, so the results equal the torch path's exactly; nothing reads them on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_moe._bias_act_kernels import INTERPRET  # noqa: F401 - the tests read it here too

#: assignments per program of the scatter
SCATTER_BLOCK = 1024
#: one-hot cells (priorities x padded experts) per program of the histogram and place kernels
CHUNK_CELLS = 8192
#: chunk histograms summed per step of the place kernel's prefix
PREFIX_STEP = 64


def expert_pad(e: int) -> int:
    return max(2, triton.next_power_of_2(e))


def chunk_size(e: int) -> int:
    return max(16, CHUNK_CELLS // expert_pad(e))


@triton.jit
def _by_priority_kernel(rank_ptr, a_at_ptr, n, S, BLOCK: tl.constexpr):
    a = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = a < n
    tok = a % S
    prio = (a - tok) + tl.load(rank_ptr + tok, mask=ok, other=0)
    tl.store(a_at_ptr + prio, a, mask=ok)


@triton.jit
def _expert_at(idx_ptr, a_at_ptr, p, ok, S, K: tl.constexpr, HAS_PRIO: tl.constexpr):
    """The assignment at priorities ``p`` and its expert (``idx`` is [S, k] token-major)."""
    if HAS_PRIO:
        a = tl.load(a_at_ptr + p, mask=ok, other=0)
    else:
        a = p
    tok = a % S
    e = tl.load(idx_ptr + tok * K + a // S, mask=ok, other=0)
    return a, e


@triton.jit
def _hist_kernel(idx_ptr, a_at_ptr, hist_ptr, n, S, K: tl.constexpr, HAS_PRIO: tl.constexpr,
                 E_PAD: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    p = c * CHUNK + tl.arange(0, CHUNK)
    ok = p < n
    _, e = _expert_at(idx_ptr, a_at_ptr, p, ok, S, K, HAS_PRIO)
    es = tl.arange(0, E_PAD)
    onehot = ((e[:, None] == es[None, :]) & ok[:, None]).to(tl.int32)
    tl.store(hist_ptr + c * E_PAD + es, tl.sum(onehot, axis=0))


@triton.jit
def _place_kernel(idx_ptr, a_at_ptr, hist_ptr, pos_ptr, order_ptr, kept_ptr, counts_ptr,
                  kept_counts_ptr, row_ptr, dest_ptr, tok_ptr, offs_ptr, n, S, E, n_chunks,
                  cap, K: tl.constexpr,
                  HAS_PRIO: tl.constexpr, HAS_CAP: tl.constexpr, E_PAD: tl.constexpr,
                  CHUNK: tl.constexpr, STEP: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    es = tl.arange(0, E_PAD)
    # per expert: assignments in the chunks before this one, and in all of them
    before = tl.zeros((E_PAD,), dtype=tl.int64)
    total = tl.zeros((E_PAD,), dtype=tl.int64)
    for c0 in range(0, n_chunks, STEP):
        cs = c0 + tl.arange(0, STEP)
        h = tl.load(hist_ptr + cs[:, None] * E_PAD + es[None, :], mask=(cs < n_chunks)[:, None],
                    other=0).to(tl.int64)  # fmt: skip
        before += tl.sum(tl.where((cs < c)[:, None], h, 0), axis=0)
        total += tl.sum(h, axis=0)
    if HAS_CAP:
        kept_total = tl.minimum(total, cap)
    else:
        kept_total = total
    kept_start = tl.cumsum(kept_total, axis=0) - kept_total
    dropped_total = total - kept_total
    dropped_start = tl.cumsum(dropped_total, axis=0) - dropped_total
    all_kept = tl.sum(kept_total, axis=0)
    if c == 0:
        tl.store(counts_ptr + es, total, mask=es < E)
        tl.store(kept_counts_ptr + es, kept_total, mask=es < E)
        # group ends of the buffer: the sentinel row 0, then each expert's kept rows
        ends = 1 + tl.cumsum(kept_total, axis=0)
        tl.store(offs_ptr + es, ends.to(tl.int32), mask=es < E)
        tl.store(tok_ptr + es, tl.zeros((E_PAD,), dtype=tl.int64), mask=es == 0)

    p = c * CHUNK + tl.arange(0, CHUNK)
    ok = p < n
    a, e = _expert_at(idx_ptr, a_at_ptr, p, ok, S, K, HAS_PRIO)
    mine = (e[:, None] == es[None, :]) & ok[:, None]
    running = tl.cumsum(mine.to(tl.int64), axis=0)  # inclusive, per expert, in priority order
    slot = tl.sum(tl.where(mine, running - 1 + before[None, :], 0), axis=1)
    k_start = tl.sum(tl.where(mine, kept_start[None, :], 0), axis=1)
    d_start = tl.sum(tl.where(mine, dropped_start[None, :], 0), axis=1)
    if HAS_CAP:
        kept = slot < cap
        pos = tl.where(kept, k_start + slot, all_kept + d_start + slot - cap)
    else:
        kept = slot >= 0
        pos = k_start + slot
    tl.store(pos_ptr + a, pos, mask=ok)
    tl.store(order_ptr + pos, a.to(tl.int64), mask=ok)
    tl.store(kept_ptr + a, kept.to(tl.int8), mask=ok)
    # the layout, token-major [S, k]: choice j of token s is assignment a = j * S + s
    tok = a % S
    tm = tok * K + a // S
    tl.store(dest_ptr + tm, pos + 1, mask=ok)
    tl.store(row_ptr + tm, tl.where(kept, pos + 1, 0), mask=ok)
    tl.store(tok_ptr + 1 + pos, tok.to(tl.int64), mask=ok)


def place(
    expert_index: torch.Tensor, token_rank: torch.Tensor | None, num_experts: int, cap: int | None
) -> tuple[torch.Tensor, ...]:
    """(position, order, kept [n] bool in assignment order, exp_counts, kept_counts, row,
    dest ([S, k] int64), token_of_row [1 + n] int64, offs [E] int32)."""
    num_tokens, k = expert_index.shape
    n = num_tokens * k
    device = expert_index.device
    idx = expert_index.contiguous()
    position = torch.empty(n, dtype=torch.int64, device=device)
    order = torch.empty(n, dtype=torch.int64, device=device)
    kept = torch.empty(n, dtype=torch.int8, device=device)
    # (no fills: the place kernel's first program writes the counts, the ends and row 0)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    kept_counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    row = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    dest = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    token_of_row = torch.empty(1 + n, dtype=torch.int64, device=device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=device)
    if n == 0:
        for t in (counts, kept_counts, token_of_row):
            t.zero_()
        offs.fill_(1)  # the sentinel row alone
        return position, order, kept.bool(), counts, kept_counts, row, dest, token_of_row, offs
    has_prio = token_rank is not None
    a_at = idx  # unused without a priority (the kernels take a_at = p)
    if has_prio:
        a_at = torch.empty(n, dtype=torch.int64, device=device)
        rank = token_rank.to(device=device, dtype=torch.int64).contiguous()
        grid = (triton.cdiv(n, SCATTER_BLOCK),)
        _by_priority_kernel[grid](rank, a_at, n, num_tokens, BLOCK=SCATTER_BLOCK, num_warps=4)
    e_pad = expert_pad(num_experts)
    chunk = chunk_size(num_experts)
    n_chunks = triton.cdiv(n, chunk)
    hist = torch.empty(n_chunks, e_pad, dtype=torch.int32, device=device)
    _hist_kernel[(n_chunks,)](idx, a_at, hist, n, num_tokens, K=k, HAS_PRIO=has_prio,
                              E_PAD=e_pad, CHUNK=chunk, num_warps=4)  # fmt: skip
    _place_kernel[(n_chunks,)](
        idx, a_at, hist, position, order, kept, counts, kept_counts, row, dest, token_of_row,
        offs, n, num_tokens, num_experts, n_chunks, 0 if cap is None else cap, K=k, HAS_PRIO=has_prio,
        HAS_CAP=cap is not None, E_PAD=e_pad, CHUNK=chunk, STEP=PREFIX_STEP, num_warps=4,
    )  # fmt: skip
    return (position, order, kept.view(torch.bool), counts, kept_counts, row, dest,
            token_of_row, offs)  # fmt: skip
