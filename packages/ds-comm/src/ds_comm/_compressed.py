"""1-bit compressed all-reduce with worker and server error feedback.

The two-phase scheme of 1-bit Adam (Tang et al., 2021, "1-bit Adam: Communication Efficient
Large-Scale Training with Adam's Convergence Speed", Algorithm 1 and section 4.2):

1. every worker adds its worker error to the tensor, splits it into ``n`` chunks (one per rank),
   compresses each chunk to sign bits (packed 8 per byte) and one fp32 scale
   ``||chunk||_2 / sqrt(numel)``, and keeps what compression lost as its new worker error;
2. an all-to-all delivers chunk ``r`` of every worker to rank ``r``, which acts as the server of
   that chunk: it averages the decompressed chunks, adds its server error, compresses again
   (keeping the new server error), and
3. an all-gather hands every rank every server's compressed chunk; all ranks decompress the same
   bits with the same scales, so the result is bitwise identical everywhere.

Per rank on the wire (ring model): ``2 (n-1)/n * P/8`` bytes of signs plus ``2 (n-1)`` scales,
against ``2 (n-1)/n * 4 N`` bytes for an fp32 all-reduce (``P`` = ``N`` padded to a multiple of
``8 n``): 32x fewer for large tensors.

Error-feedback bound (what the tests check): with worker errors ``e_i`` and server error ``s``
starting at zero, the compressor's outputs telescope, so after ``K`` calls on inputs ``x_k^i``

    sum_k out_k  =  sum_k mean_i x_k^i  -  mean_i e_i(K)  -  s(K)   (elementwise, chunk-wise)

hence ``|mean_k out_k - mean_k mean_i x_k^i| <= (max_i |e_i(K)| + |s(K)|) / K``: the running mean
converges to the true mean as 1/K as long as the error buffers stay bounded (they do for bounded
inputs: sign compression with an RMS scale never loses more than the input's magnitude plus
the scale).

The transport (torch.distributed or mpi4py) is a small object with ``all_to_all`` and
``all_gather``; the arithmetic is shared, so both give the same result on the same inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ds_comm import _logger as _lg
from ds_comm._bitpack import pack_signs, unpack_signs
from ds_comm._checks import check_group, check_tensor
from ds_comm._coalesced import all_reduce_coalesced
from ds_comm._collectives import ReduceOp, all_gather_into_tensor, all_to_all_single
from ds_comm._logger import CommsLogger, OpKind

SIGNS_LOG_NAME = "compressed_allreduce.signs"
SCALES_LOG_NAME = "compressed_allreduce.scales"


class CompressedComm(Protocol):
    """What compressed_allreduce needs from a transport."""

    rank: int
    world_size: int

    def all_to_all(self, send: torch.Tensor, log_name: str) -> torch.Tensor:
        """``send`` is (n, k); returns (n, k) whose row ``i`` is row ``rank`` of rank ``i``."""

    def all_gather(self, send: torch.Tensor, log_name: str) -> torch.Tensor:
        """``send`` is (k,); returns (n, k) whose row ``i`` is rank ``i``'s ``send``."""

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Exact in-place mean over the ranks (the optimizers' full-precision steps)."""

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value`` (used once per error-feedback state to check sizes agree)."""


class TorchComm:
    """Transport over torch.distributed (nccl, gloo, ...) through the logged ds_comm collectives."""

    def __init__(self, group: Any = None, logger: CommsLogger | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "compressed_allreduce: torch.distributed is not initialised; call "
                "ds_comm.init_distributed() first (or use comm_backend_name='mpi')"
            )
        if group is not None:
            check_group(group, "compressed_allreduce")
        self.group = group
        self.logger = logger
        self.rank: int = dist.get_rank(group)
        self.world_size: int = dist.get_world_size(group)

    def all_to_all(self, send: torch.Tensor, log_name: str) -> torch.Tensor:
        recv = torch.empty_like(send)
        all_to_all_single(recv, send, group=self.group, log_name=log_name, logger=self.logger)
        return recv

    def all_gather(self, send: torch.Tensor, log_name: str) -> torch.Tensor:
        # Flat output: gloo checks each rank's slice against the input's shape.
        out = torch.empty(self.world_size * send.numel(), dtype=send.dtype, device=send.device)
        all_gather_into_tensor(out, send, group=self.group, log_name=log_name, logger=self.logger)
        return out.view(self.world_size, send.numel())

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Exact (full precision) in-place mean of ``tensors`` over the group."""
        all_reduce_coalesced(tensors, ReduceOp.AVG, self.group, logger=self.logger)

    def gather_ints(self, value: int) -> list[int]:
        # gloo cannot gather CUDA tensors and nccl cannot gather CPU ones: use object collectives.
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return [int(v) for v in out]


class MpiComm:
    """Transport over mpi4py: ``Alltoall``/``Allgather`` on host numpy buffers, or directly on
    device buffers when the MPI library is CUDA-aware (``cuda_aware=True``)."""

    def __init__(
        self, comm: Any = None, cuda_aware: bool = False, logger: CommsLogger | None = None
    ) -> None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(
                "comm_backend_name='mpi' needs mpi4py: `pip install 'ds-comm[mpi]'` with an MPI "
                "library installed (Debian: apt-get install openmpi-bin libopenmpi-dev)"
            ) from e
        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.cuda_aware = cuda_aware
        self.logger = logger
        self.rank: int = self.comm.Get_rank()
        self.world_size: int = self.comm.Get_size()

    def _buffers(self, send: torch.Tensor, recv_shape: tuple[int, ...]):
        if self.cuda_aware or send.device.type == "cpu":
            if send.device.type != "cpu":
                from ds_accel import get_accelerator

                get_accelerator().synchronize()  # MPI reads device memory outside the stream
            recv = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
            return send, recv, recv
        host_send = send.cpu()
        host_recv = torch.empty(recv_shape, dtype=send.dtype)
        return host_send, host_recv, None

    def _run(self, fn: Any, send: torch.Tensor, recv_shape, name: str, kind: OpKind, size: int):
        s, r, device_recv = self._buffers(send.contiguous(), recv_shape)
        byte = self._mpi.BYTE
        # Buffers passed as raw bytes: the same call serves uint8 signs and fp32 scales, and
        # device tensors through __cuda_array_interface__ (CUDA-aware MPI).
        sbuf = s if s.device.type != "cpu" else s.numpy()
        rbuf = r if r.device.type != "cpu" else r.numpy()
        lg = self.logger if self.logger is not None else _lg._default_logger
        t0 = time.perf_counter()
        fn([sbuf, byte], [rbuf, byte])
        if lg.enabled:
            lg.record(name, kind, size, time.perf_counter() - t0, self.world_size)
        return device_recv if device_recv is not None else r.to(send.device)

    def all_to_all(self, send: torch.Tensor, log_name: str) -> torch.Tensor:
        nbytes = send.numel() * send.element_size()
        return self._run(
            self.comm.Alltoall, send, tuple(send.shape), log_name, OpKind.ALL_TO_ALL, nbytes
        )

    def all_gather(self, send: torch.Tensor, log_name: str) -> torch.Tensor:
        shape = (self.world_size, send.numel())
        nbytes = self.world_size * send.numel() * send.element_size()
        return self._run(self.comm.Allgather, send, shape, log_name, OpKind.ALL_GATHER, nbytes)

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Exact in-place mean of ``tensors`` over the communicator (one flat host buffer)."""
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
        buf = flat.numpy()
        lg = self.logger if self.logger is not None else _lg._default_logger
        t0 = time.perf_counter()
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        if lg.enabled:
            lg.record(
                "all_reduce_mean",
                OpKind.ALL_REDUCE,
                buf.nbytes,
                time.perf_counter() - t0,
                self.world_size,
            )
        flat /= self.world_size
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def gather_ints(self, value: int) -> list[int]:
        return [int(v) for v in self.comm.allgather(int(value))]


def make_compressed_comm(
    comm_backend_name: str = "nccl",
    group: Any = None,
    cuda_aware: bool = False,
    logger: CommsLogger | None = None,
) -> TorchComm | MpiComm:
    """The transport for DeepSpeed's ``comm_backend_name``: ``"nccl"``, ``"gloo"``, ``"hccl"``,
    ``"torch"`` (all mean torch.distributed's current default group or ``group``) or ``"mpi"``."""
    name = comm_backend_name.lower()
    if name == "mpi":
        return MpiComm(cuda_aware=cuda_aware, logger=logger)
    if name in ("nccl", "gloo", "hccl", "torch", "compressed"):
        if dist.is_initialized() and name in ("nccl", "gloo"):
            actual = dist.get_backend(group)
            if actual != name:
                raise ValueError(
                    f"comm_backend_name={comm_backend_name!r} but torch.distributed runs "
                    f"{actual!r}; pass comm_backend_name={actual!r} (or 'torch' for whatever "
                    f"backend is initialised)"
                )
        return TorchComm(group=group, logger=logger)
    raise ValueError(
        f"comm_backend_name={comm_backend_name!r} is not supported; use 'nccl', 'gloo', 'torch' "
        f"(torch.distributed) or 'mpi' (mpi4py)"
    )


@dataclass
class ErrorFeedback:
    """Worker and server error buffers of one compressed tensor; persists across calls.

    Use one instance per tensor that is all-reduced repeatedly (a flat momentum buffer, a
    gradient bucket): the errors are meaningful only for the same tensor layout. ``reset()``
    clears them (e.g. when the quantity being compressed changes meaning).
    """

    #: elements of the tensor this state belongs to (set on first use, then checked)
    numel: int | None = None
    world_size: int | None = None
    #: fp32, ``padded_numel`` elements: what this rank's compression lost so far
    worker_error: torch.Tensor | None = None
    #: fp32, ``padded_numel // world_size`` elements: what the server compression of this rank's
    #: chunk lost so far
    server_error: torch.Tensor | None = None
    _valid: torch.Tensor | None = field(default=None, repr=False)

    @property
    def padded_numel(self) -> int:
        assert self.numel is not None and self.world_size is not None
        unit = 8 * self.world_size
        return -(-self.numel // unit) * unit

    def reset(self) -> None:
        if self.worker_error is not None:
            self.worker_error.zero_()
        if self.server_error is not None:
            self.server_error.zero_()

    def _bind(self, numel: int, comm: CompressedComm, device: torch.device) -> None:
        if self.numel is not None:
            if numel != self.numel or comm.world_size != self.world_size:
                raise ValueError(
                    f"compressed_allreduce: this ErrorFeedback belongs to a tensor of "
                    f"{self.numel} elements over {self.world_size} ranks, got {numel} elements "
                    f"over {comm.world_size}; use one ErrorFeedback per tensor"
                )
            if self.worker_error is not None and self.worker_error.device != device:
                self.worker_error = self.worker_error.to(device)
                self.server_error = self.server_error.to(device)  # type: ignore[union-attr]
                self._valid = self._valid.to(device)  # type: ignore[union-attr]
            return
        sizes = comm.gather_ints(numel)
        if len(set(sizes)) != 1:
            raise ValueError(
                f"compressed_allreduce: ranks passed tensors of different sizes {sizes} "
                f"(numel per rank); every rank must compress a tensor of the same size"
            )
        self.numel, self.world_size = numel, comm.world_size
        chunk = self.padded_numel // comm.world_size
        self.worker_error = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        self.server_error = torch.zeros(chunk, dtype=torch.float32, device=device)
        starts = torch.arange(comm.world_size, device=device) * chunk
        self._valid = (numel - starts).clamp(0, chunk).to(torch.float32)


def _compress(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (rows, C) -> packed signs (rows, C/8) and RMS scales (rows,).

    Scales divide by the number of real (non-padding) elements; padding is zero in ``x`` (the
    error buffers are kept zero there) so it does not add to the norm.
    """
    scales = torch.linalg.vector_norm(x, dim=1) / valid.clamp_min(1).sqrt()
    return pack_signs(x).view(x.shape[0], -1), scales


def _decompress(signs: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    return unpack_signs(signs).view(-1, cols).mul_(scales.view(-1, 1))


def _subtract_compressed_(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x - decompress(compress(x))`` in place, from ``x`` itself: the sign bit is ``x >= 0``,
    so the packed bits need not be unpacked again (one pass fewer over the tensor)."""
    s = scales.view(-1, 1)
    return x.sub_(torch.where(x >= 0, s, -s))


def compressed_allreduce(
    tensor: torch.Tensor,
    error_feedback: ErrorFeedback,
    group: Any = None,
    *,
    comm: CompressedComm | None = None,
    logger: CommsLogger | None = None,
) -> torch.Tensor:
    """Replace ``tensor`` (on every rank) with the 1-bit compressed mean over the ranks.

    ``error_feedback`` carries the worker/server errors between calls (one per tensor). ``comm``
    picks the transport (default: torch.distributed over ``group``; see
    :func:`make_compressed_comm` for mpi4py). Returns ``tensor``. The result is an approximation
    of ``mean_i tensor_i`` whose running mean over calls converges to the true running mean
    (see the module docstring for the bound).
    """
    check_tensor(tensor, "compressed_allreduce")
    if not tensor.is_floating_point():
        raise TypeError(
            f"compressed_allreduce: expects a floating tensor, got {tensor.dtype}; sign "
            f"compression of integers is meaningless"
        )
    if not isinstance(error_feedback, ErrorFeedback):
        raise TypeError(
            "compressed_allreduce: `error_feedback` must be a ds_comm.ErrorFeedback (create one "
            "per tensor and pass it on every call)"
        )
    if comm is None:
        comm = TorchComm(group, logger)
    n, r = comm.world_size, comm.rank
    numel = tensor.numel()
    error_feedback._bind(numel, comm, tensor.device)
    ef = error_feedback
    we, se, valid = ef.worker_error, ef.server_error, ef._valid
    assert we is not None and se is not None and valid is not None
    padded = ef.padded_numel
    chunk = padded // n

    # Phase 1 (worker): compensate, compress per destination chunk, remember the loss.
    buf = we.clone()
    buf[:numel].add_(tensor.reshape(-1).to(torch.float32))
    rows = buf.view(n, chunk)
    signs, scales = _compress(rows, valid)
    we.copy_(_subtract_compressed_(rows, scales).view(-1))
    we[numel:].zero_()  # padding never carries error

    # Each rank receives its chunk from every worker and serves it.
    recv_signs = comm.all_to_all(signs, SIGNS_LOG_NAME)
    recv_scales = comm.all_to_all(scales.view(n, 1), SCALES_LOG_NAME)
    server = _decompress(recv_signs, recv_scales.view(-1), chunk).mean(dim=0).add_(se)
    my_valid = max(0, min(chunk, numel - r * chunk))
    if my_valid < chunk:
        server[my_valid:].zero_()

    # Phase 2 (server): compress the compensated average, remember the loss, share it.
    s_signs, s_scale = _compress(server.view(1, chunk), valid[r : r + 1])
    se.copy_(_subtract_compressed_(server.view(1, chunk), s_scale).view(-1))
    if my_valid < chunk:
        se[my_valid:].zero_()
    all_signs = comm.all_gather(s_signs.view(-1), SIGNS_LOG_NAME)
    all_scales = comm.all_gather(s_scale.view(1), SCALES_LOG_NAME)
    out = _decompress(all_signs, all_scales.view(-1), chunk).view(-1)[:numel]
    tensor.copy_(out.view_as(tensor))
    return tensor


def compressed_wire_bytes(numel: int, world_size: int) -> dict[str, int]:
    """Bytes one rank sends per call (ring model), for reports and tests of the byte logging."""
    unit = 8 * world_size
    padded = math.ceil(numel / unit) * unit
    n = world_size
    signs = 2 * (n - 1) * (padded // 8) // n
    scales = 2 * (n - 1) * 4  # one fp32 per peer in each phase
    fp32_allreduce = round(2 * (n - 1) * 4 * numel / n)
    return {"signs": signs, "scales": scales, "fp32_allreduce": fp32_allreduce}
