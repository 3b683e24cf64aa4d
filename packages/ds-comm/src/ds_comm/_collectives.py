"""Collectives with the names and signatures of ``torch.distributed``, routed through the logger.

Each function checks its arguments (no communication), then either calls ``torch.distributed``
directly (logger off: the fast path) or lets the logger time and record the call. With
``async_op=True`` the torch work handle is returned; when logging it is wrapped so that the
latency is recorded at ``wait()``.

Two additions over torch.distributed, both keyword-only: ``log_name`` (the row the call is
recorded under, default the function name) and ``logger`` (an explicit :class:`CommsLogger`
instead of the shared default). ``ReduceOp.AVG`` also works on gloo, which lacks it natively
(SUM then divide, floating dtypes only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ds_comm import _logger as _lg
from ds_comm._checks import (
    check_group,
    check_list_dtype,
    check_list_len,
    check_reducible,
    check_same_dtype,
    check_same_numel,
    check_self_chunk,
    check_tensor,
)
from ds_comm._logger import CommsLogger, OpKind

ReduceOp = dist.ReduceOp
# torch 2.12+ renamed the tensor forms (the old names warn); use whichever this torch has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ProcessGroup = Any  # torch's ProcessGroup or None (the default group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _avg_on_gloo(op: Any, group: ProcessGroup) -> bool:
    return op == ReduceOp.AVG and dist.get_backend(group) == "gloo"


class _ThenWork:
    """Handle that runs a host-side epilogue (AVG division, copy-back) after the op completes."""

    def __init__(self, works: Sequence[Any], then: Any) -> None:
        self._works = [w for w in works if w is not None]
        self._then = then
        self._done = False

    def wait(self, timeout: Any = None) -> bool:
        for w in self._works:
            w.wait() if timeout is None else w.wait(timeout)
        if not self._done:
            self._done = True
            self._then()
        return True

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)


def _with_avg_division(work: Any, tensor: torch.Tensor, group: ProcessGroup, async_op: bool):
    def divide() -> None:
        tensor.div_(dist.get_world_size(group))

    if async_op:
        return _ThenWork([work], divide)
    divide()
    return work


def _avg_dtype_check(tensor: torch.Tensor, op: str) -> None:
    if not tensor.is_floating_point():
        raise TypeError(
            f"ds_comm.{op}: ReduceOp.AVG needs a floating dtype, got {tensor.dtype}; "
            f"use SUM and divide, or cast to float"
        )


_SUM = ReduceOp.SUM
_AVG = ReduceOp.AVG
_BOOL = torch.bool


def all_reduce(
    tensor: torch.Tensor,
    op: Any = _SUM,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "all_reduce",
    logger: CommsLogger | None = None,
):
    # The tight-loop collective: the common case (contiguous non-bool tensor, default group,
    # SUM, logger off) costs two attribute reads and identity tests before torch is called
    # (``op == AVG`` on torch's pybind enum alone costs more than all of that, hence ``is``).
    try:
        ok = tensor.is_contiguous() and tensor.dtype is not _BOOL
    except AttributeError:
        ok = False
    if not ok or group is not None:
        check_tensor(tensor, "all_reduce")
        check_reducible(tensor, "all_reduce")
        if group is not None:
            check_group(group, "all_reduce")
    lg = logger if logger is not None else _lg._default_logger
    if op is not _SUM and op == _AVG and dist.get_backend(group) == "gloo":
        _avg_dtype_check(tensor, "all_reduce")
        work = all_reduce(tensor, _SUM, group, async_op, log_name=log_name, logger=lg)
        return _with_avg_division(work, tensor, group, async_op)
    if not lg.enabled:
        return dist.all_reduce(tensor, op, group, async_op)  # positional: no kwargs dict
    return lg.run(
        log_name,
        OpKind.ALL_REDUCE,
        _nbytes(tensor),
        dist.get_world_size(group),
        tensor.device,
        lambda: dist.all_reduce(tensor, op=op, group=group, async_op=async_op),
        async_op,
    )


def reduce(
    tensor: torch.Tensor,
    dst: int,
    op: Any = ReduceOp.SUM,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "reduce",
    logger: CommsLogger | None = None,
):
    check_tensor(tensor, "reduce")
    check_reducible(tensor, "reduce")
    if group is not None:
        check_group(group, "reduce")
    lg = logger if logger is not None else _lg._default_logger
    if op == ReduceOp.AVG and _avg_on_gloo(op, group):
        _avg_dtype_check(tensor, "reduce")
        work = reduce(tensor, dst, ReduceOp.SUM, group, async_op, log_name=log_name, logger=lg)
        if dist.get_rank() != dst:
            return work
        return _with_avg_division(work, tensor, group, async_op)

    def launch():
        return dist.reduce(tensor, dst, op=op, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        log_name,
        OpKind.REDUCE,
        _nbytes(tensor),
        dist.get_world_size(group),
        tensor.device,
        launch,
        async_op,
    )


def broadcast(
    tensor: torch.Tensor,
    src: int,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "broadcast",
    logger: CommsLogger | None = None,
):
    check_tensor(tensor, "broadcast")
    if group is not None:
        check_group(group, "broadcast")
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.broadcast(tensor, src, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        log_name,
        OpKind.BROADCAST,
        _nbytes(tensor),
        dist.get_world_size(group),
        tensor.device,
        launch,
        async_op,
    )


def all_gather(
    tensor_list: list[torch.Tensor],
    tensor: torch.Tensor,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "all_gather",
    logger: CommsLogger | None = None,
):
    check_tensor(tensor, "all_gather")
    if group is not None:
        check_group(group, "all_gather")
    n = dist.get_world_size(group)
    check_list_len(tensor_list, n, "all_gather", "tensor_list")
    check_same_numel(tensor_list, tensor.numel(), "all_gather", "tensor_list", "`tensor`")
    check_list_dtype(tensor_list, tensor.dtype, "all_gather", "tensor_list", "`tensor`")
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        log_name, OpKind.ALL_GATHER, n * _nbytes(tensor), n, tensor.device, launch, async_op
    )


def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "all_gather_into_tensor",
    logger: CommsLogger | None = None,
):
    op = "all_gather_into_tensor"
    check_tensor(output_tensor, op, "output_tensor")
    check_tensor(input_tensor, op, "input_tensor")
    check_same_dtype(output_tensor, input_tensor, op, "output_tensor", "input_tensor")
    if group is not None:
        check_group(group, op)
    n = dist.get_world_size(group)
    if output_tensor.numel() != n * input_tensor.numel():
        raise ValueError(
            f"ds_comm.{op}: `output_tensor` has {output_tensor.numel()} elements but must hold "
            f"world_size ({n}) x input_tensor.numel() ({input_tensor.numel()}) = "
            f"{n * input_tensor.numel()}"
        )
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return _all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        log_name,
        OpKind.ALL_GATHER,
        _nbytes(output_tensor),
        n,
        input_tensor.device,
        launch,
        async_op,
    )


def reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "reduce_scatter",
    logger: CommsLogger | None = None,
):
    """List form of reduce-scatter. Gloo has no reduce_scatter of lists; there it runs as one
    ``reduce_scatter_tensor`` over the concatenated inputs (same result, same bytes)."""
    name = "reduce_scatter"
    check_tensor(output, name, "output")
    check_reducible(output, name, "output")
    if group is not None:
        check_group(group, name)
    n = dist.get_world_size(group)
    check_list_len(input_list, n, name, "input_list")
    check_same_numel(input_list, output.numel(), name, "input_list", "`output`")
    check_list_dtype(input_list, output.dtype, name, "input_list", "`output`")
    if dist.get_backend(group) == "gloo":
        flat = torch.cat([t.reshape(-1) for t in input_list])
        return reduce_scatter_tensor(
            output, flat, op, group, async_op, log_name=log_name, logger=logger
        )
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        log_name, OpKind.REDUCE_SCATTER, n * _nbytes(output), n, output.device, launch, async_op
    )


def reduce_scatter_tensor(
    output: torch.Tensor,
    input: torch.Tensor,  # noqa: A002 - torch.distributed's parameter name
    op: Any = ReduceOp.SUM,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "reduce_scatter_tensor",
    logger: CommsLogger | None = None,
):
    name = "reduce_scatter_tensor"
    check_tensor(output, name, "output")
    check_tensor(input, name, "input")
    check_reducible(input, name, "input")
    check_same_dtype(output, input, name, "output", "input")
    if group is not None:
        check_group(group, name)
    n = dist.get_world_size(group)
    if input.numel() != n * output.numel():
        raise ValueError(
            f"ds_comm.{name}: `input` has {input.numel()} elements but must hold world_size "
            f"({n}) x output.numel() ({output.numel()}) = {n * output.numel()}"
        )
    lg = logger if logger is not None else _lg._default_logger
    if op == ReduceOp.AVG and _avg_on_gloo(op, group):
        _avg_dtype_check(input, name)
        work = reduce_scatter_tensor(
            output, input, ReduceOp.SUM, group, async_op, log_name=log_name, logger=lg
        )
        return _with_avg_division(work, output, group, async_op)

    def launch():
        return _reduce_scatter_single(output, input, op=op, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        log_name, OpKind.REDUCE_SCATTER, _nbytes(input), n, input.device, launch, async_op
    )


def all_gather_single(output_tensor, input_tensor, group=None, async_op=False, *, logger=None):
    """torch 2.12+'s name for :func:`all_gather_into_tensor` (logged as ``all_gather_single``)."""
    return all_gather_into_tensor(
        output_tensor, input_tensor, group, async_op, log_name="all_gather_single", logger=logger
    )


def reduce_scatter_single(
    output, input, op=ReduceOp.SUM, group=None, async_op=False, *, logger=None
):  # noqa: A002
    """torch 2.12+'s name for :func:`reduce_scatter_tensor` (logged as ``reduce_scatter_single``)."""
    return reduce_scatter_tensor(
        output, input, op, group, async_op, log_name="reduce_scatter_single", logger=logger
    )


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,  # noqa: A002
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "all_to_all_single",
    logger: CommsLogger | None = None,
):
    name = "all_to_all_single"
    check_tensor(output, name, "output")
    check_tensor(input, name, "input")
    check_same_dtype(output, input, name, "output", "input")
    if group is not None:
        check_group(group, name)
    n = dist.get_world_size(group)
    for arg, t, splits in (
        ("input", input, input_split_sizes),
        ("output", output, output_split_sizes),
    ):
        dim0 = t.shape[0] if t.dim() else 1
        if splits is None:
            if dim0 % n:
                raise ValueError(
                    f"ds_comm.{name}: `{arg}` has {dim0} rows, not divisible by world_size {n}; "
                    f"pass {arg}_split_sizes"
                )
        else:
            check_list_len(splits, n, name, f"{arg}_split_sizes")
            if sum(splits) != dim0:
                raise ValueError(
                    f"ds_comm.{name}: {arg}_split_sizes sum to {sum(splits)} but `{arg}` has "
                    f"{dim0} rows"
                )
    r = dist.get_rank(group)

    def own_chunk(t: torch.Tensor, splits: list[int] | None) -> int:
        dim0 = t.shape[0] if t.dim() else 1
        return (splits[r] if splits is not None else dim0 // n) * math.prod(t.shape[1:])

    check_self_chunk(
        own_chunk(input, input_split_sizes),
        own_chunk(output, output_split_sizes),
        r,
        name,
        f"input_split_sizes[{r}] rows of `input`" if input_split_sizes else f"1/{n} of `input`",
        f"output_split_sizes[{r}] rows of `output`" if output_split_sizes else f"1/{n} of `output`",
    )
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.all_to_all_single(
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )

    if not lg.enabled:
        return launch()
    return lg.run(log_name, OpKind.ALL_TO_ALL, _nbytes(input), n, input.device, launch, async_op)


def all_to_all(
    output_tensor_list: list[torch.Tensor],
    input_tensor_list: list[torch.Tensor],
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "all_to_all",
    logger: CommsLogger | None = None,
):
    """List form. Gloo lacks it; there it is built from ``all_to_all_single`` on flat buffers."""
    name = "all_to_all"
    if group is not None:
        check_group(group, name)
    n = dist.get_world_size(group)
    check_list_len(output_tensor_list, n, name, "output_tensor_list")
    check_list_len(input_tensor_list, n, name, "input_tensor_list")
    for i, t in enumerate(input_tensor_list):
        check_tensor(t, name, f"input_tensor_list[{i}]")
    for i, t in enumerate(output_tensor_list):
        check_tensor(t, name, f"output_tensor_list[{i}]")
    dtype = input_tensor_list[0].dtype
    what = "`input_tensor_list[0]`"
    check_list_dtype(input_tensor_list, dtype, name, "input_tensor_list", what)
    check_list_dtype(output_tensor_list, dtype, name, "output_tensor_list", what)
    r = dist.get_rank(group)
    check_self_chunk(
        input_tensor_list[r].numel(),
        output_tensor_list[r].numel(),
        r,
        name,
        f"input_tensor_list[{r}]",
        f"output_tensor_list[{r}]",
    )
    if dist.get_backend(group) == "gloo":
        flat_in = torch.cat([t.reshape(-1) for t in input_tensor_list])
        flat_out = torch.empty(
            sum(t.numel() for t in output_tensor_list),
            dtype=flat_in.dtype,
            device=flat_in.device,
        )
        work = all_to_all_single(
            flat_out,
            flat_in,
            [t.numel() for t in output_tensor_list],
            [t.numel() for t in input_tensor_list],
            group,
            async_op,
            log_name=log_name,
            logger=logger,
        )

        def unpack() -> None:
            for t, part in zip(
                output_tensor_list, flat_out.split([t.numel() for t in output_tensor_list])
            ):
                t.copy_(part.view_as(t))

        if async_op:
            return _ThenWork([work], unpack)
        unpack()
        return work
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.all_to_all(
            output_tensor_list, input_tensor_list, group=group, async_op=async_op
        )

    if not lg.enabled:
        return launch()
    nbytes = sum(_nbytes(t) for t in input_tensor_list)
    return lg.run(
        log_name, OpKind.ALL_TO_ALL, nbytes, n, input_tensor_list[0].device, launch, async_op
    )


def gather(
    tensor: torch.Tensor,
    gather_list: list[torch.Tensor] | None = None,
    dst: int = 0,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "gather",
    logger: CommsLogger | None = None,
):
    check_tensor(tensor, "gather")
    if group is not None:
        check_group(group, "gather")
    n = dist.get_world_size(group)
    if gather_list is not None:
        check_list_len(gather_list, n, "gather", "gather_list")
        check_same_numel(gather_list, tensor.numel(), "gather", "gather_list", "`tensor`")
        check_list_dtype(gather_list, tensor.dtype, "gather", "gather_list", "`tensor`")
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.gather(tensor, gather_list, dst=dst, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(log_name, OpKind.GATHER, n * _nbytes(tensor), n, tensor.device, launch, async_op)


def scatter(
    tensor: torch.Tensor,
    scatter_list: list[torch.Tensor] | None = None,
    src: int = 0,
    group: ProcessGroup = None,
    async_op: bool = False,
    *,
    log_name: str = "scatter",
    logger: CommsLogger | None = None,
):
    check_tensor(tensor, "scatter")
    if group is not None:
        check_group(group, "scatter")
    n = dist.get_world_size(group)
    if scatter_list is not None:
        check_list_len(scatter_list, n, "scatter", "scatter_list")
        check_same_numel(scatter_list, tensor.numel(), "scatter", "scatter_list", "`tensor`")
        check_list_dtype(scatter_list, tensor.dtype, "scatter", "scatter_list", "`tensor`")
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.scatter(tensor, scatter_list, src=src, group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(log_name, OpKind.SCATTER, n * _nbytes(tensor), n, tensor.device, launch, async_op)


def _p2p(kind: OpKind, fn: Any, tensor: torch.Tensor, peer: int, group, tag, async_op, name, lg):
    check_tensor(tensor, name)
    if group is not None:
        check_group(group, name)
    lg = lg if lg is not None else _lg._default_logger

    def launch():
        return fn(tensor, peer, group=group, tag=tag)

    if not lg.enabled:
        return launch()
    return lg.run(name, kind, _nbytes(tensor), 2, tensor.device, launch, async_op)


def send(tensor, dst: int, group=None, tag: int = 0, *, logger: CommsLogger | None = None):
    return _p2p(OpKind.SEND, dist.send, tensor, dst, group, tag, False, "send", logger)


def recv(tensor, src: int | None = None, group=None, tag: int = 0, *, logger=None):
    return _p2p(OpKind.RECV, dist.recv, tensor, src, group, tag, False, "recv", logger)


def isend(tensor, dst: int, group=None, tag: int = 0, *, logger: CommsLogger | None = None):
    return _p2p(OpKind.SEND, dist.isend, tensor, dst, group, tag, True, "isend", logger)


def irecv(tensor, src: int | None = None, group=None, tag: int = 0, *, logger=None):
    return _p2p(OpKind.RECV, dist.irecv, tensor, src, group, tag, True, "irecv", logger)


def barrier(
    group: ProcessGroup = None, async_op: bool = False, *, logger: CommsLogger | None = None
):
    if group is not None:
        check_group(group, "barrier")
    lg = logger if logger is not None else _lg._default_logger

    def launch():
        return dist.barrier(group=group, async_op=async_op)

    if not lg.enabled:
        return launch()
    return lg.run(
        "barrier",
        OpKind.BARRIER,
        0,
        dist.get_world_size(group),
        torch.device("cpu"),
        launch,
        async_op,
    )


def new_group(
    ranks: Sequence[int] | None = None,
    timeout: timedelta | None = None,
    backend: str | None = None,
):
    """``torch.distributed.new_group`` with the ranks checked first (it must be called by every
    rank of the default group, members or not; non-members get ``GroupMember.NON_GROUP_MEMBER``,
    which every ds_comm collective rejects with a clear error)."""
    if ranks is not None:
        ranks = list(ranks)
        world = dist.get_world_size()
        bad = [r for r in ranks if not isinstance(r, int) or r < 0 or r >= world]
        if bad:
            raise ValueError(
                f"ds_comm.new_group: ranks {bad} are outside the default group of size {world}"
            )
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ds_comm.new_group: `ranks` has duplicates: {ranks}")
    return dist.new_group(ranks=ranks, timeout=timeout, backend=backend)


def get_rank(group: ProcessGroup = None) -> int:
    return dist.get_rank(group)


def get_world_size(group: ProcessGroup = None) -> int:
    return dist.get_world_size(group)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()
