"""``DistributedAttention``: DeepSpeed-Ulysses around any local attention callable."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ds_seq._exchange import seq_exchange
from ds_seq._heads import head_splits

HEAD_DIM = 2  # q/k/v are [b, s, h, d] (batch_dim_idx 0) or [s, b, h, d] (batch_dim_idx 1)


def _group_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _seq_dim(x: Tensor, batch_dim_idx: int) -> int:
    if batch_dim_idx not in (0, 1):
        raise ValueError(
            f"batch_dim_idx must be 0 ([b, s, h, d]) or 1 ([s, b, h, d]), got {batch_dim_idx}"
        )
    if x.dim() != 4:
        raise ValueError(f"DistributedAttention expects 4-D query/key/value ([b, s, h, d] or [s, b, h, d]); "
                         f"got a tensor of shape {tuple(x.shape)}")  # fmt: skip
    return 1 - batch_dim_idx


def heads_from_sequence(
    x: Tensor, batch_dim_idx: int, group: Any, num_kv_heads: int | None = None
) -> Tensor:
    """[.., s/p, H, d] sequence shard of every head -> [.., s, H_r, d] whole sequence of this
    rank's heads (``H_r`` per :func:`head_splits`). Differentiable; every rank's shard must have
    the same length."""
    world = _group_size(group)
    seq = _seq_dim(x, batch_dim_idx)
    heads = head_splits(x.shape[HEAD_DIM], world, num_kv_heads)
    return seq_exchange(x, HEAD_DIM, seq, heads, [x.shape[seq]] * world, group)


def sequence_from_heads(
    x: Tensor, batch_dim_idx: int, group: Any, num_heads: int, num_kv_heads: int | None = None
) -> Tensor:
    """Inverse of :func:`heads_from_sequence`: [.., s, H_r, d] -> [.., s/p, H, d]. ``num_heads``
    is the total head count ``H`` of the tensor before the forward exchange."""
    world = _group_size(group)
    seq = _seq_dim(x, batch_dim_idx)
    if x.shape[seq] % world != 0:
        raise ValueError(
            f"sequence length {x.shape[seq]} is not divisible by the sequence parallel size {world}"
        )
    heads = head_splits(num_heads, world, num_kv_heads)
    return seq_exchange(x, seq, HEAD_DIM, [x.shape[seq] // world] * world, heads, group)


def total_heads(x: Tensor, group: Any, num_kv_heads: int | None = None) -> int:
    """The head count summed over ``group`` of head-sharded ``x`` (``[.., s, H_r, d]``). When
    ``num_kv_heads`` divides the group the split is even (:func:`head_splits`) and the count is
    local; otherwise one all-gather of the counts, since uneven head slices cannot be inferred
    from one rank's."""
    world = _group_size(group)
    if world == 1 or (num_kv_heads is not None and num_kv_heads % world == 0):
        return x.shape[HEAD_DIM] * world
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    mine = torch.full((1,), x.shape[HEAD_DIM], dtype=torch.int64, device=x.device)
    dist.all_gather(counts, mine, group=group)
    return int(torch.cat(counts).sum().item())  # one host sync for all counts


def _exchange(
    x: Tensor, scatter_idx: int, batch_dim_idx: int, group: Any, num_kv_heads: int | None
) -> Tensor:
    """DeepSpeed's all-to-all direction by ``scatter_idx``: ``>= 2`` sequence shards of every
    head -> the whole sequence of this rank's heads; ``< 2`` the reverse."""
    if scatter_idx >= 2:
        return heads_from_sequence(x, batch_dim_idx, group, num_kv_heads)
    heads = total_heads(x, group, num_kv_heads)
    return sequence_from_heads(x, batch_dim_idx, group, heads, num_kv_heads)


def single_all_to_all(
    input: Tensor,
    scatter_idx: int,
    gather_idx: int,
    batch_dim_idx: int,
    group: Any,
    async_op: bool = False,
    handle: Any = None,
    type: Any = None,  # noqa: A002 - DeepSpeed's parameter name
    num_kv_heads: int | None = None,
) -> Tensor:
    """DeepSpeed's ``deepspeed.sequence.layer.single_all_to_all``: ``scatter_idx >= 2`` turns a
    sequence shard of every head into the whole sequence of this rank's heads, ``scatter_idx <
    2`` the reverse; ``num_kv_heads`` (GQA, or head counts the group does not divide) sets the
    head split as :func:`head_splits`. Not differentiable (see :class:`SeqAllToAll`). DeepSpeed's
    overlapped path (``async_op=True`` with a ``handle``) is not implemented: it is refused."""
    if async_op:
        raise NotImplementedError(
            "single_all_to_all(async_op=True): the overlapped exchange is not implemented in "
            "ds-seq; call it with async_op=False (the exchange runs on the current stream)"
        )
    with torch.no_grad():
        return _exchange(input, scatter_idx, batch_dim_idx, group, num_kv_heads)


def uneven_heads_all2all(
    input: Tensor, scatter_idx: int, gather_idx: int, batch_dim_idx: int, group: Any,
    num_kv_heads: int,
) -> Tensor:  # fmt: skip
    """DeepSpeed's name for the exchange with head counts the group does not divide: the same
    exchange as :func:`single_all_to_all` (one all-to-all with unequal pieces)."""
    return single_all_to_all(
        input, scatter_idx, gather_idx, batch_dim_idx, group, num_kv_heads=num_kv_heads
    )


def register_all_to_all_group(group: Any) -> str:
    """DeepSpeed registers ``group`` by name for its compiled exchange operator; the exchange
    here takes the group itself, so this only returns the name DeepSpeed would."""
    return str(group.group_name)


class SeqAllToAll(torch.autograd.Function):
    """DeepSpeed's ``_SeqAllToAll``: ``SeqAllToAll.apply(group, input, scatter_idx, gather_idx,
    batch_dim_idx, stream=None, handle=None, type=None, is_fwd=True, num_kv_heads=None)``, the
    differentiable :func:`single_all_to_all` (its backward is the inverse exchange)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, group: Any, input: Tensor, scatter_idx: int, gather_idx: int,
        batch_dim_idx: int, stream: Any = None, handle: Any = None, type: Any = None,  # noqa: A002
        is_fwd: bool = True, num_kv_heads: int | None = None,
    ) -> Tensor:  # fmt: skip
        ctx.group, ctx.scatter_idx, ctx.batch_dim_idx = group, scatter_idx, batch_dim_idx
        ctx.num_kv_heads = num_kv_heads
        ctx.heads = input.shape[HEAD_DIM]  # scatter_idx >= 2: the backward gathers back to this
        return _exchange(input, scatter_idx, batch_dim_idx, group, num_kv_heads)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        with torch.no_grad():
            if ctx.scatter_idx >= 2:
                g = sequence_from_heads(
                    grad, ctx.batch_dim_idx, ctx.group, ctx.heads, ctx.num_kv_heads
                )
            else:
                g = heads_from_sequence(grad, ctx.batch_dim_idx, ctx.group, ctx.num_kv_heads)
        return (None, g, None, None, None, None, None, None, None, None)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(t: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``freqs_cos.shape[-1]`` channels of ``t`` (the rest pass
    through): ``t * cos + rotate_half(t) * sin``, DeepSpeed's ``apply_rotary_pos_emb``."""
    rot = freqs_cos.shape[-1]
    head, rest = t[..., :rot], t[..., rot:]
    out = head * freqs_cos + _rotate_half(head) * freqs_sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class DistributedAttention(nn.Module):
    """DeepSpeed-Ulysses: all-to-all from sequence shards to head shards, local attention over
    the whole sequence of this rank's heads, and the inverse all-to-all back.

    ``local_attention(q, k, v, *args, **kwargs)`` is any callable (SDPA, flash attention, a
    module) taking and returning tensors in the layout of the inputs with the whole sequence and
    this rank's heads. ``scatter_idx``/``gather_idx`` are DeepSpeed's: ``scatter_idx >= 2``
    (the default) means inputs arrive sequence-sharded and are scattered over heads; the layout
    itself comes from ``batch_dim_idx`` at forward (0: ``[b, s, h, d]``, 1: ``[s, b, h, d]``).
    ``num_kv_heads``: the model's KV head count, needed only when it does not divide the group
    and is not the key tensor's head count; by default it is read from the key of each forward.
    ``sp_stream`` is accepted for DeepSpeed compatibility; the exchanges run on the current
    stream (no separate communication stream).
    """

    def __init__(
        self,
        local_attention: Any,
        sequence_process_group: Any,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        sp_stream: Any = None,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if scatter_idx == gather_idx:
            raise ValueError(
                f"DistributedAttention: scatter_idx and gather_idx must differ, both are {scatter_idx}"
            )
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.sp_stream = sp_stream
        self.num_kv_heads = num_kv_heads

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        batch_dim_idx: int,
        rotary_pos_emb: tuple[Tensor, Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        kv_heads = self.num_kv_heads if self.num_kv_heads is not None else key.shape[HEAD_DIM]
        if self.scatter_idx >= 2:
            num_heads = query.shape[HEAD_DIM]
            q, k, v = (
                heads_from_sequence(t, batch_dim_idx, self.spg, kv_heads)
                for t in (query, key, value)
            )
        else:
            # inputs arrive head-sharded over the whole sequence: the reverse exchange first
            num_heads = self._total_heads(query)
            total_kv = self._total_heads(key)
            q = sequence_from_heads(query, batch_dim_idx, self.spg, num_heads, total_kv)
            k = sequence_from_heads(key, batch_dim_idx, self.spg, total_kv, total_kv)
            v = sequence_from_heads(value, batch_dim_idx, self.spg, total_kv, total_kv)
        if rotary_pos_emb is not None:
            # DeepSpeed passes cos/sin as [b?, s, 1, d] and applies them in the exchanged layout
            cos, sin = (t.permute(1, 0, 2, 3) for t in rotary_pos_emb)
            q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        context = self.local_attn(q, k, v, *args, **kwargs)
        if self.scatter_idx >= 2:
            return sequence_from_heads(context, batch_dim_idx, self.spg, num_heads, kv_heads)
        return heads_from_sequence(context, batch_dim_idx, self.spg, kv_heads)

    def _total_heads(self, x: Tensor) -> int:
        return total_heads(x, self.spg)

    def layer_sync(self, layer: Any) -> None:
        """DeepSpeed's hook for its overlapped exchanges (waits for a layer's event on the
        communication stream); the exchanges here run on the current stream: nothing to wait."""
