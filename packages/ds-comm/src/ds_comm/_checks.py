"""Argument checks shared by the collectives.

Only checks that cost no communication live here: they run on every call, including the
logger-off fast path, so each is a couple of attribute reads. Each error names the collective,
the argument and the fix, because the backend's own message (a gloo enforce failure or an NCCL
"invalid argument") rarely says which call of the user's program was wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def check_tensor(t: object, op: str, arg: str = "tensor") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ds_comm.{op}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(
            f"ds_comm.{op}: `{arg}` is not contiguous (shape {tuple(t.shape)}, stride "
            f"{t.stride()}); collectives read and write the raw storage, so pass "
            f"`{arg}.contiguous()` (and copy the result back if it is an output)"
        )
    return t


def check_reducible(t: torch.Tensor, op: str, arg: str = "tensor") -> None:
    if t.dtype is torch.bool:
        raise TypeError(
            f"ds_comm.{op}: `{arg}` has dtype torch.bool, which the backends cannot reduce; "
            f"cast it with `.to(torch.uint8)` (SUM counts, MAX is logical or)"
        )


def check_group(group: object, op: str) -> None:
    # new_group() returns this sentinel on ranks outside the group; torch.distributed then
    # silently does nothing, which turns a rank-selection bug into a hang elsewhere.
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"ds_comm.{op}: rank {dist.get_rank()} is not a member of the process group passed "
            f"as `group`; call {op} only on the ranks listed in new_group(ranks=...)"
        )


def check_same_numel(
    tensors: Sequence[torch.Tensor], expected: int, op: str, arg: str, what: str
) -> None:
    for i, t in enumerate(tensors):
        check_tensor(t, op, f"{arg}[{i}]")
        if t.numel() != expected:
            raise ValueError(
                f"ds_comm.{op}: `{arg}[{i}]` has {t.numel()} elements but {what} has "
                f"{expected}; every entry must have the same size"
            )


def check_list_len(seq: Sequence[object], n: int, op: str, arg: str) -> None:
    if len(seq) != n:
        raise ValueError(
            f"ds_comm.{op}: `{arg}` has {len(seq)} entries but the group has {n} ranks; "
            f"pass one tensor per rank"
        )


def check_same_dtype(a: torch.Tensor, b: torch.Tensor, op: str, arg_a: str, arg_b: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(
            f"ds_comm.{op}: `{arg_a}` is {a.dtype} but `{arg_b}` is {b.dtype}; use one dtype"
        )


def check_list_dtype(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype, op: str, arg: str, what: str
) -> None:
    # gloo's flat-buffer emulations (all_to_all, reduce_scatter of lists) would otherwise cast
    # silently (torch.cat promotes, copy_ converts), and the native list forms fail with an
    # error that names neither the call nor the argument.
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            raise TypeError(
                f"ds_comm.{op}: `{arg}[{i}]` is {t.dtype} but {what} is {dtype}; every tensor of "
                f"the call must have one dtype"
            )


def check_self_chunk(sent: int, received: int, rank: int, op: str, sent_arg: str, recv_arg: str):
    """In an all-to-all, the chunk a rank sends to itself is the chunk it receives from itself,
    so their sizes must agree; this is the one cross-rank size that is checkable locally
    (gloo otherwise aborts with an enforce failure naming neither the call nor the argument)."""
    if sent != received:
        raise ValueError(
            f"ds_comm.{op}: rank {rank} sends itself {sent} elements ({sent_arg}) but expects "
            f"{received} from itself ({recv_arg}); entry {rank} of the input and output layouts "
            f"must have the same size"
        )
