"""Tiled compute along the sequence: MLP, logits + loss, any token-wise function.

At long sequence lengths the MLP's ``[seq, intermediate]`` activations and the ``[seq, vocab]``
logits dominate memory. These functions run the computation one tile of tokens at a time and
keep none of a tile's activations: ``TiledMLP`` and ``SequenceTiledCompute`` recompute each
tile in backward; ``TiledFusedLogitsLoss`` runs each tile's backward right in forward (the loss
is the last op of the step) and keeps only the input gradient.

Parameter gradients are computed per tile with ``torch.autograd.grad``, summed, and handed to
autograd as the gradients of the parameters passed in, so each parameter's gradient is
accumulated once per backward, after all tiles. ZeRO, DDP and FSDP hooks that fire when a
parameter's gradient is accumulated therefore see one final gradient (DeepSpeed instead
accumulates every tile into ``.grad`` and marks ``ds_grad_is_ready`` for its own ZeRO only).
The parameters are ``compute_params`` plus every parameter of the module passed as ``self``
that requires grad. Any other ``nn.Parameter`` that ``fn`` uses (found in the first tile's
autograd graph) gets its gradient too, summed over the tiles the same way and accumulated
once at the end of the backward, so forgetting one in ``compute_params`` never drops a
gradient (DeepSpeed accumulates such parameters tile by tile).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _params(module: Any, compute_params: Sequence[Tensor] | None) -> list[Tensor]:
    found: dict[int, Tensor] = {}
    for p in compute_params or ():
        if p.requires_grad:
            found.setdefault(id(p), p)
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.requires_grad:
                found.setdefault(id(p), p)
    return list(found.values())


def _grads(
    output: Tensor, inputs: list[Tensor], grad_output: Tensor | None
) -> tuple[Tensor | None, ...]:
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return tuple(None for _ in inputs)
    got = iter(torch.autograd.grad(output, wanted, grad_output, allow_unused=True))
    return tuple(next(got) if t.requires_grad else None for t in inputs)


def _unlisted_params(out: Tensor, listed: Sequence[Tensor]) -> list[Tensor]:
    """The ``nn.Parameter`` leaves of ``out``'s autograd graph that require grad and are not in
    ``listed``: parameters ``fn`` uses that the caller did not pass."""
    known = {id(t) for t in listed}
    found: dict[int, Tensor] = {}
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if isinstance(var, nn.Parameter) and var.requires_grad and id(var) not in known:
            found.setdefault(id(var), var)
        stack.extend(n for n, _ in node.next_functions)
    return list(found.values())


class _Extra:
    """Gradients of the unlisted parameters, summed over tiles, accumulated once at the end."""

    params: list[Tensor] | None
    grads: list[Tensor | None]

    def __init__(self) -> None:
        self.params, self.grads = None, []

    def inputs(self, out: Tensor, listed: Sequence[Tensor]) -> list[Tensor]:
        if self.params is None:  # every tile runs the same function: look once
            self.params = _unlisted_params(out, listed)
            self.grads = [None] * len(self.params)
        return self.params

    def add(self, grads: Sequence[Tensor | None]) -> None:
        _add(self.grads, grads)

    def accumulate(self, scale: Tensor | None = None) -> None:
        """Into the parameters' ``.grad`` through autograd, so their hooks fire once."""
        pairs = [(p, g) for p, g in zip(self.params or (), self.grads) if g is not None]
        if scale is not None:
            pairs = [(p, g.mul_(scale.to(g.dtype))) for p, g in pairs]
        if pairs:
            torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        self.params, self.grads = None, []


def _tile_grads(
    out: Tensor, inputs: list[Tensor], grad_output: Tensor | None, extra: _Extra
) -> tuple[Tensor | None, ...]:
    """``_grads`` over ``inputs`` plus the unlisted parameters (summed into ``extra``)."""
    more = extra.inputs(out, inputs)
    g = _grads(out, [*inputs, *more], grad_output)
    extra.add(g[len(inputs) :])
    return g[: len(inputs)]


def _add(acc: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is None:
            continue
        acc[i] = g if acc[i] is None else acc[i].add_(g)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------- TiledMLP
class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], module: Any, shards: int, x: Tensor,  # type: ignore[override]
                *params: Tensor) -> Tensor:  # fmt: skip
        ctx.fn, ctx.module, ctx.shards = fn, module, shards
        ctx.save_for_backward(x, *params)
        out: Tensor | None = None
        offset = 0
        with torch.no_grad():
            # each tile's output goes straight into the full output: concatenating the tile
            # outputs would hold the whole output twice, one [tokens, hidden] per token more
            for xs in torch.chunk(x, shards, dim=-2):
                ys = fn(module, xs)
                if out is None:
                    shape = list(ys.shape)
                    shape[-2] = x.shape[-2]
                    out = ys.new_empty(shape)
                n = ys.shape[-2]
                out.narrow(-2, offset, n).copy_(ys)
                offset += n
                del ys
        assert out is not None  # torch.chunk gives at least one tile
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, *params = ctx.saved_tensors
        hidden = x.shape[-1]
        # tokens are independent: tile the flattened [tokens, hidden] view (contiguous tiles
        # whatever the batch size)
        flat = x.detach().reshape(-1, hidden)
        grad_flat = grad.reshape(-1, grad.shape[-1])
        x_grad = torch.empty_like(flat) if x.requires_grad else None
        acc: list[Tensor | None] = [None] * len(params)
        extra = _Extra()
        offset = 0
        for xs in torch.chunk(flat, ctx.shards, dim=0):
            n = xs.shape[0]
            xs = xs.detach().requires_grad_(x.requires_grad)
            with torch.enable_grad():
                out = ctx.fn(ctx.module, xs)
            g = _tile_grads(out, [xs, *params], grad_flat[offset : offset + n], extra)
            if x_grad is not None and g[0] is not None:
                x_grad[offset : offset + n] = g[0]
            _add(acc, g[1:])
            offset += n
        extra.accumulate()
        x_grad = x_grad.view(x.shape) if x_grad is not None else None
        return (None, None, None, x_grad, *acc)


class TiledMLP:
    """``TiledMLP.apply(fn, self, x, shards, compute_params)``: ``fn(self, x)`` (an MLP, or any
    token-wise function) run over ``shards`` tiles of ``x`` along dim -2 without keeping the
    tiles' activations; backward recomputes one tile at a time. ``x``: ``[bs, seq, hidden]`` or
    ``[seq, hidden]``. DeepSpeed's autograd function and arguments."""

    @staticmethod
    def apply(fn: Callable[..., Tensor], self: Any, x: Tensor, shards: int,
              compute_params: Sequence[Tensor] | None = None) -> Tensor:  # fmt: skip
        if int(shards) < 1:
            raise ValueError(f"TiledMLP: shards must be >= 1, got {shards}")
        params = _params(self, compute_params)
        return _TiledMLPFunction.apply(fn, self, int(shards), x, *params)


def tiled_mlp_forward(module: nn.Module, x: Tensor, shards: int | None = None) -> Tensor:
    """A gated MLP (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, Llama's) through
    :class:`TiledMLP`; ``shards`` defaults to ``ceil(seq / hidden)`` as DeepSpeed's recipe."""
    seqlen, hidden = x.shape[-2], x.shape[-1]
    n = shards or max(1, math.ceil(seqlen / hidden))

    def mlp(self: Any, t: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(t)) * self.up_proj(t))

    return TiledMLP.apply(mlp, module, x, n, None)


def enable_tiled_mlp(model: nn.Module, shards: int | None = None) -> int:
    """Route the forward of every gated-MLP submodule of ``model`` (those with ``gate_proj``,
    ``up_proj``, ``down_proj`` and ``act_fn``, as in Llama, Mistral, Qwen) through
    :class:`TiledMLP`, on these instances only. Returns how many were switched."""
    count = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = (  # type: ignore[method-assign]
                lambda x, _m=module: tiled_mlp_forward(_m, x, shards)
            )
            count += 1
    return count


# ---------------------------------------------------------------------- TiledFusedLogitsLoss
class _TiledLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], module: Any, shards: int, reduction: str,  # type: ignore[override]
                grad_enabled: bool, x: Tensor, y: Tensor, mask: Tensor | None, *params: Tensor) -> Tensor:  # fmt: skip
        bs_seq = x.shape[:2]
        flat_x = x.detach().reshape(-1, *x.shape[2:])
        flat_y = y.reshape(-1, *y.shape[2:])
        flat_m = mask.reshape(-1) if mask is not None else None
        xs_list = torch.chunk(flat_x, shards, dim=0)
        ys_list = torch.chunk(flat_y, shards, dim=0)
        ms_list = (
            torch.chunk(flat_m, shards, dim=0) if flat_m is not None else [None] * len(xs_list)
        )
        # the incoming gradient of each tile's output under the reduction of the tile outputs
        scale = 1.0 / len(xs_list) if reduction == "mean" else 1.0
        # with grad recording on outside, parameters fn uses but nobody listed may want grads
        want_grad = grad_enabled or x.requires_grad or any(p.requires_grad for p in params)
        x_grad = torch.empty_like(flat_x) if x.requires_grad else None
        acc: list[Tensor | None] = [None] * len(params)
        extra = _Extra()
        outputs = []
        offset = 0
        for xs, ys, ms in zip(xs_list, ys_list, ms_list, strict=True):
            n = xs.shape[0]
            args = (module, xs, ys) if ms is None else (module, xs, ys, ms)
            if want_grad:
                xs.requires_grad_(x.requires_grad)
                with torch.enable_grad():
                    out = fn(*args)
                g = _tile_grads(out, [xs, *params], torch.full_like(out, scale), extra)
                if x_grad is not None and g[0] is not None:
                    x_grad[offset : offset + n] = g[0]
                _add(acc, g[1:])
                out = out.detach()
            else:
                with torch.no_grad():
                    out = fn(*args)
            outputs.append(out.reshape(()))
            offset += n
        stacked = torch.stack(outputs)
        ctx.param_grads, ctx.extra = acc, extra
        ctx.x_grad = x_grad.view(*bs_seq, *flat_x.shape[1:]) if x_grad is not None else None
        return stacked.mean() if reduction == "mean" else stacked.sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_grad, acc, extra = ctx.x_grad, ctx.param_grads, ctx.extra
        ctx.x_grad = ctx.param_grads = ctx.extra = None
        # the tile gradients were taken with an incoming gradient of 1 (per the reduction);
        # the real one may be a loss scale or 1/gradient_accumulation_steps
        if not bool(grad == 1):
            x_grad = x_grad.mul_(grad) if x_grad is not None else None
            acc = [g.mul_(grad.to(g.dtype)) if g is not None else None for g in acc]
            extra.accumulate(grad)
        else:
            extra.accumulate()
        return (None, None, None, None, None, x_grad, None, None, *acc)


class TiledFusedLogitsLoss:
    """``TiledFusedLogitsLoss.apply(fn, self, x, y, mask, shards, compute_params,
    output_reduction)``: the loss ``fn(self, x_tile, y_tile[, mask_tile])`` over ``shards`` tiles
    of the flattened ``[bs * seq]`` tokens without materialising the whole logits: each tile's
    logits live only while its loss and gradients are computed. The result is the mean
    (``"mean"``) or the sum (``"sum"``) of the tile outputs; for a per-token mean with unequal
    tiles or masks, return sums from ``fn`` and divide by the token count (as DeepSpeed advises).
    DeepSpeed's autograd function and arguments."""

    @staticmethod
    def apply(fn: Callable[..., Tensor], self: Any, x: Tensor, y: Tensor, mask: Tensor | None,
              shards: int, compute_params: Sequence[Tensor] | None = None,
              output_reduction: str = "mean") -> Tensor:  # fmt: skip
        if output_reduction not in ("mean", "sum"):
            raise ValueError(
                f'unknown reduction {output_reduction}: valid values are: "mean"/"sum"'
            )
        if x.dim() < 2 or y.dim() < 2:
            raise ValueError("x and y must be at least 2D [batch_size, seq_len, ...]")
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(
                f"x and y batch/seq dims must match: {tuple(x.shape[:2])} vs {tuple(y.shape[:2])}"
            )
        if mask is not None and (mask.dim() != 2 or mask.shape != x.shape[:2]):
            raise ValueError(
                f"mask must be 2D [batch_size, seq_len] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
            )
        if int(shards) < 1:
            raise ValueError(f"TiledFusedLogitsLoss: shards must be >= 1, got {shards}")
        params = _params(self, compute_params)
        return _TiledLossFunction.apply(
            fn, self, int(shards), output_reduction, torch.is_grad_enabled(), x, y, mask, *params
        )


def tiled_causal_lm_loss_sum(
    lm_head: nn.Module, hidden_states: Tensor, shift_labels: Tensor, shards: int | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(sum of token cross-entropies, non-ignored token count) of ``lm_head(hidden_states)``
    against already-shifted labels, through :class:`TiledFusedLogitsLoss` (logits in fp32 one
    tile at a time). ``shards`` defaults to as many tiles as keep one tile's fp32 logits
    within about 1 GiB."""
    tokens = hidden_states.shape[0] * hidden_states.shape[1]
    vocab = lm_head.weight.shape[0] if hasattr(lm_head, "weight") else 1
    n = shards or max(1, math.ceil(tokens * vocab * 4 / 2**30))

    def loss_fn(head: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = head(x).float()
        return torch.nn.functional.cross_entropy(
            logits, y, ignore_index=ignore_index, reduction="sum"
        )

    total = TiledFusedLogitsLoss.apply(
        loss_fn, lm_head, hidden_states, shift_labels, None, n, None, "sum"
    )
    return total, (shift_labels != ignore_index).sum()


# ---------------------------------------------------------------------- SequenceTiledCompute
class _SeqTiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: dict[str, Any], *tensors: Tensor) -> Tensor:  # type: ignore[override]
        n_args = spec["n_args"]
        args, params = tensors[:n_args], tensors[n_args:]
        ctx.spec = spec
        # kwargs_to_pass may hold non-tensors, which save_for_backward refuses
        ctx.args, ctx.params = list(args), list(params)
        shard_kw, pass_kw = _split_kwargs(spec, args)
        with torch.no_grad():
            outs = [spec["fn"](**{k: v[:, lo:hi] for k, v in shard_kw.items()}, **pass_kw)
                    for lo, hi in spec["ranges"]]  # fmt: skip
        dim = spec["unshard_dim"]
        full = torch.stack([o.reshape(()) for o in outs]) if dim == 0 else torch.cat(outs, dim=dim)
        ctx.out_shape = full.shape
        reduction = spec["reduction"]
        return full if reduction is None else (full.mean() if reduction == "mean" else full.sum())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        spec = ctx.spec
        n_args = spec["n_args"]
        args, params = list(ctx.args), ctx.params
        ctx.args = ctx.params = None
        key_index = spec["grad_index"]
        target = args[key_index]
        # only the key's tensor gets a gradient: the other arguments enter each tile's recompute
        # as constants (so the search for unlisted parameters stays inside fn's computation)
        args = [a.detach() if isinstance(a, Tensor) else a for a in args]
        shard_kw, pass_kw = _split_kwargs(spec, args)
        key = spec["grad_key"]
        reduction, dim = spec["reduction"], spec["unshard_dim"]
        numel = math.prod(ctx.out_shape)
        target_grad = torch.zeros_like(target) if target.requires_grad else None
        acc: list[Tensor | None] = [None] * len(params)
        extra = _Extra()
        offset = 0
        for i, (lo, hi) in enumerate(spec["ranges"]):
            tiles = {k: v[:, lo:hi] for k, v in shard_kw.items()}
            tile = tiles[key].detach().requires_grad_(target.requires_grad)
            tiles[key] = tile
            with torch.enable_grad():
                out = spec["fn"](**tiles, **pass_kw)
            if reduction == "sum":
                g_out = grad.expand_as(out)
            elif reduction == "mean":
                g_out = (grad / numel).expand_as(out)
            elif dim == 0:
                g_out = grad[i].reshape(out.shape)
            else:
                n = out.shape[dim]
                g_out = grad.narrow(dim, offset, n)
                offset += n
            g = _tile_grads(out, [tile, *params], g_out, extra)
            if target_grad is not None and g[0] is not None:
                target_grad[:, lo:hi] = g[0]
            _add(acc, g[1:])
        extra.accumulate()
        grads: list[Tensor | None] = [None] * n_args
        grads[key_index] = target_grad
        return (None, *grads, *acc)


def _split_kwargs(
    spec: dict[str, Any], args: Sequence[Tensor]
) -> tuple[dict[str, Any], dict[str, Any]]:
    keys_shard, keys_pass = spec["keys_to_shard"], spec["keys_to_pass"]
    shard_kw = dict(zip(keys_shard, args[: len(keys_shard)], strict=True))
    pass_kw = dict(zip(keys_pass, args[len(keys_shard) :], strict=True))
    return shard_kw, pass_kw


class SequenceTiledCompute:
    """``SequenceTiledCompute.apply(fn, seqlen, shards, keys_to_shard, keys_to_pass,
    grad_requiring_tensor_key, compute_params, output_unshard_dimension, output_reduction,
    *args)``: DeepSpeed's generic tiled compute (see :func:`sequence_tiled_compute`)."""

    @staticmethod
    def apply(fn: Callable[..., Tensor], seqlen: int, shards: int, keys_to_shard: Sequence[str],
              keys_to_pass: Sequence[str], grad_requiring_tensor_key: str,
              compute_params: Sequence[Tensor] | None, output_unshard_dimension: int,
              output_reduction: str | None, *args: Any) -> Tensor:  # fmt: skip
        if output_reduction not in (None, "mean", "sum"):
            raise ValueError(f"unknown value {output_reduction}: valid values are: none/mean/sum")
        if int(shards) < 1:
            raise ValueError(f"sequence_tiled_compute: shards must be >= 1, got {shards}")
        keys = list(keys_to_shard) + list(keys_to_pass)
        if grad_requiring_tensor_key not in keys_to_shard:
            raise ValueError(f"grad_requiring_tensor_key {grad_requiring_tensor_key!r} must be one of the sharded "
                             f"keys {list(keys_to_shard)}")  # fmt: skip
        if len(args) != len(keys):
            raise ValueError(
                f"sequence_tiled_compute: {len(args)} tensors for {len(keys)} keys {keys}"
            )
        step = math.ceil(seqlen / shards)
        # tiles of ceil(seqlen / shards) tokens as DeepSpeed; trailing empty tiles are skipped
        ranges = [(lo, min(lo + step, seqlen)) for lo in range(0, seqlen, step)]
        spec = {
            "fn": fn, "keys_to_shard": list(keys_to_shard), "keys_to_pass": list(keys_to_pass),
            "grad_key": grad_requiring_tensor_key, "grad_index": keys.index(grad_requiring_tensor_key),
            "n_args": len(args), "ranges": ranges, "unshard_dim": output_unshard_dimension,
            "reduction": output_reduction,
        }  # fmt: skip
        params = _params(None, compute_params)
        return _SeqTiledFunction.apply(spec, *args, *params)


def sequence_tiled_compute(
    fn: Callable[..., Tensor],
    seqlen: int,
    shards: int,
    kwargs_to_shard: dict[str, Tensor],
    kwargs_to_pass: dict[str, Any],
    grad_requiring_tensor_key: str,
    compute_params: Sequence[Tensor] | None = None,
    output_unshard_dimension: int = 1,
    output_reduction: str | None = "mean",
) -> Tensor:
    """Run ``fn(**tile_kwargs, **kwargs_to_pass)`` over tiles of ``ceil(seqlen / shards)``
    tokens of every ``kwargs_to_shard`` tensor (``[bs, seqlen, ...]``, cut along dim 1), keeping
    no tile's activations; backward recomputes tile by tile and returns the gradient of
    ``grad_requiring_tensor_key`` (and of ``compute_params``). The tile outputs are
    concatenated along ``output_unshard_dimension`` (0: each tile returns a scalar, stacked)
    and reduced by ``output_reduction`` (None, "mean" or "sum"). DeepSpeed's arguments."""
    return SequenceTiledCompute.apply(
        fn, seqlen, shards, list(kwargs_to_shard), list(kwargs_to_pass), grad_requiring_tensor_key,
        compute_params, output_unshard_dimension, output_reduction,
        *kwargs_to_shard.values(), *kwargs_to_pass.values(),
    )  # fmt: skip
