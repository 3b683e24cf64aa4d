"""ZeRO++ communication for stage-3 buckets: qwZ, hpZ and qgZ (Wang et al., 2023).

- qwZ (``quantized_weights``; ``quantized_nontrainable_weights`` for frozen buckets only): a
  parameter all-gather sends each rank's shard as block-wise int8 codes plus fp32 scales and
  dequantizes the gathered codes into the compute-dtype flat buffer. As in DeepSpeed, every
  rank's part, this rank's own included, comes from the dequantized codes, so all ranks compute
  with identical weights (keeping the exact local values would make replicas disagree).
  Frozen buckets under ``quantized_nontrainable_weights`` also *store* their shard quantized
  (half the memory of bf16), as DeepSpeed does for LoRA-style frozen bases.
- hpZ (``hpz_partition_size`` h > 1): when a gathered bucket is released, this rank keeps its
  1/h slice of the full parameters (the secondary partition, in the shard's memory: device, or
  host with parameter offload); later gathers (backward, recomputation, further micro-steps)
  all-gather the secondary partitions inside the group of h consecutive data-parallel ranks
  (one node when h = ranks per node). An optimizer step invalidates the secondary partitions of
  trainable buckets (frozen buckets keep theirs).
- qgZ (``quantized_gradients``): the reduce-scatter of a bucket's gradients becomes two
  all-to-alls of int4 codes (block-wise scales): inside each node, each rank sends every peer the
  chunks that peer's column of ranks owns; the receiver dequantizes and sums in fp32 (the
  intra-node reduction), requantizes, and an all-to-all across nodes between ranks of the same
  local index delivers the per-node partial sums of this rank's chunk, dequantized and summed in
  fp32. Cross-node traffic is ``1 / (8 x ranks per node)`` of an fp32 reduce-scatter's input.
  With one node it falls back to the reduce-scatter (as DeepSpeed does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ds_zero._dist import all_gather_single, all_to_all_single, group_rank, group_size

WEIGHT_BITS = 8
WEIGHT_BLOCK = 4096  # DeepSpeed's qwZ groups are 4k-8k elements (adaptive); fixed here
GRAD_BITS = 4
GRAD_BLOCK = 256  # int4: finer blocks than the weights' keep the 4-bit error lower (+6% bytes)


def _quantize(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ds_kernels import quantize_blockwise

    return quantize_blockwise(x, bits=bits, block=block)


def _dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    n: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    from ds_kernels import dequantize_blockwise

    return dequantize_blockwise(
        codes, scales, bits=bits, block=block, numel=n, dtype=dtype, out=out
    )


def ranks_per_node(configured: int | None, world: int) -> int:
    """Ranks of one node: the option, else the launcher's ``LOCAL_WORLD_SIZE``, else the
    accelerator's device count (DeepSpeed's rule), else the whole world."""
    if configured is not None:
        return configured
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    from ds_accel import get_accelerator

    accel = get_accelerator()
    count = accel.device_count() if accel.device_name() != "cpu" else 0
    return count if count > 0 else world


def _subgroups(
    parent: ProcessGroup | None, blocks: Sequence[Sequence[int]], rank: int
) -> ProcessGroup | None:
    """Create one process group per block of parent-group ranks (every rank takes part in every
    creation, in the same order); return the group holding ``rank``."""
    mine = None
    for ranks in blocks:
        members = [dist.get_global_rank(parent, r) if parent is not None else r for r in ranks]
        group = dist.new_group(members)
        if rank in ranks:
            mine = group
    return mine


def _pack(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of codes followed by their scales' bytes: one message instead of two."""
    rows = codes.reshape(-1, codes.shape[-1])
    sc = scales.reshape(rows.shape[0], -1).contiguous().view(torch.uint8)
    return torch.cat((rows.view(torch.uint8), sc), dim=1)


def _unpack(
    packed: torch.Tensor, code_bytes: int, code_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    codes = packed[:, :code_bytes].view(code_dtype)
    scales = packed[:, code_bytes:].contiguous().view(torch.float32)
    return codes, scales


class _QuantGather:
    """An in-flight quantized all-gather; ``wait()`` dequantizes into the bucket's buffer."""

    def __init__(self, work: object, packed: torch.Tensor, out: torch.Tensor, part: int) -> None:
        self.work = work
        self.packed = packed  # (parts, code bytes + scale bytes)
        self.out = out
        self.part = part  # values per rank

    def wait(self) -> bool:
        self.work.wait()  # type: ignore[attr-defined]
        codes, scales = _unpack(self.packed, self.part, torch.int8)
        # straight into the bucket's buffer: no values tensor, no second pass to copy it
        _dequantize(codes, scales, WEIGHT_BITS, WEIGHT_BLOCK, self.part, self.out.dtype, self.out)
        return True


class ZeroPP:
    """The ZeRO++ options of one wrapped model and the process groups they need."""

    def __init__(
        self,
        *,
        dp_group: ProcessGroup | None,
        quantized_weights: bool,
        quantized_nontrainable_weights: bool,
        quantized_gradients: bool,
        hpz_partition_size: int,
        node_size: int | None,
    ) -> None:
        self.dp_group = dp_group
        self.world = group_size(dp_group)
        self.rank = group_rank(dp_group)
        self.quantized_weights = quantized_weights
        self.quantized_nontrainable_weights = quantized_nontrainable_weights
        self.secondary: dict[int, torch.Tensor] = {}  # bucket index -> this rank's 1/h slice
        self.frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # quantized frozen shards
        self.hpz_size = 1
        self.hpz_group: ProcessGroup | None = None
        h = min(hpz_partition_size, self.world)
        if h > 1:
            if self.world % h:
                raise ValueError(
                    f"zero_hpz_partition_size={hpz_partition_size} must divide the data-parallel "
                    f"world size {self.world}"
                )
            blocks = [range(i, i + h) for i in range(0, self.world, h)]
            self.hpz_group = _subgroups(dp_group, blocks, self.rank)
            self.hpz_size = h
        self.intra_group: ProcessGroup | None = None
        self.inter_group: ProcessGroup | None = None
        self.local = 1
        self.nodes = 1
        if quantized_gradients and self.world > 1:
            local = min(ranks_per_node(node_size, self.world), self.world)
            if local < 1 or self.world % local:
                raise ValueError(
                    f"zero_quantized_gradients: {local} ranks per node (LOCAL_WORLD_SIZE or the "
                    f"device count) must divide the data-parallel world size {self.world}"
                )
            self.local, self.nodes = local, self.world // local
            if self.nodes > 1:
                intra = [range(n * local, (n + 1) * local) for n in range(self.nodes)]
                inter = [range(i, self.world, local) for i in range(local)]
                self.intra_group = _subgroups(dp_group, intra, self.rank) if local > 1 else None
                self.inter_group = _subgroups(dp_group, inter, self.rank)

    # ---- which buckets ------------------------------------------------------------------
    def _on_dp_group(self, bucket: object) -> bool:
        return getattr(bucket, "group", None) is self.dp_group

    def quantizes_gather(self, bucket: object) -> bool:
        if getattr(bucket, "trainable", False):
            return self.quantized_weights
        return self.quantized_weights or self.quantized_nontrainable_weights

    def quantizes_reduce(self, bucket: object) -> bool:
        return self.nodes > 1 and self._on_dp_group(bucket)

    # ---- construction: frozen shards stored quantized ----------------------------------------
    @torch.no_grad()
    def adopt(self, bucket: object) -> None:
        """Called once a stage-3 bucket is built."""
        b = bucket
        if not (b.shard_params and not b.trainable and self.quantized_nontrainable_weights):  # type: ignore[attr-defined]
            return
        if b.local_shard is None:  # type: ignore[attr-defined]
            return
        self.frozen[b.index] = _quantize(b.local_shard, WEIGHT_BITS, WEIGHT_BLOCK)  # type: ignore[attr-defined]
        b.local_shard = None  # type: ignore[attr-defined]

    def frozen_shard(self, bucket: object) -> torch.Tensor | None:
        """The dequantized values of a frozen bucket stored quantized (None otherwise)."""
        stored = self.frozen.get(bucket.index)  # type: ignore[attr-defined]
        if stored is None:
            return None
        n = bucket.layout.shard_numel  # type: ignore[attr-defined]
        return _dequantize(*stored, WEIGHT_BITS, WEIGHT_BLOCK, n, bucket.param_dtype)  # type: ignore[attr-defined]

    @torch.no_grad()
    def store_frozen(self, bucket: object, values: torch.Tensor) -> None:
        self.frozen[bucket.index] = _quantize(values, WEIGHT_BITS, WEIGHT_BLOCK)  # type: ignore[attr-defined]
        self.secondary.pop(bucket.index, None)  # type: ignore[attr-defined]

    # ---- parameter gathers --------------------------------------------------------------
    def fills_own_part(self, bucket: object, exact: bool = False) -> bool:
        """Whether ``gather`` produces this rank's part itself (no local copy needed first)."""
        idx = bucket.index  # type: ignore[attr-defined]
        return (not exact and idx in self.secondary) or idx in self.frozen

    @torch.no_grad()
    def gather(self, bucket: object, mine: torch.Tensor, exact: bool = False) -> object | None:
        """Start the all-gather of ``bucket.flat`` (``mine``: this rank's primary part, already
        filled unless ``fills_own_part``); returns the work, or None when the bucket's plain
        all-gather applies. ``exact``: the plain all-gather of the stored values (a frozen
        shard stored quantized is dequantized into ``mine`` first)."""
        b = bucket
        if exact:
            stored = self.frozen_shard(b)
            if stored is not None:
                mine.copy_(stored)
            return None
        flat: torch.Tensor = b.flat  # type: ignore[attr-defined]
        sec = self.secondary.get(b.index)  # type: ignore[attr-defined]
        quant = self.quantizes_gather(b)
        if sec is not None:
            group, parts = self.hpz_group, self.hpz_size
            src = sec.to(flat.device, non_blocking=True)
            name = "zero3_hpz_all_gather"
        else:
            group, parts = b.group, b.world  # type: ignore[attr-defined]
            stored = self.frozen.get(b.index)  # type: ignore[attr-defined]
            if stored is not None:
                codes, scales = (t.to(flat.device) for t in stored)
                return self._start_quantized(flat, codes, scales, group, parts, name="zero3_qwz")
            src = mine
            name = "zero3_all_gather"
        if quant:
            codes, scales = _quantize(src, WEIGHT_BITS, WEIGHT_BLOCK)
            return self._start_quantized(flat, codes, scales, group, parts, name=name + "_qwz")
        if sec is None:
            return None
        own = flat.view(parts, -1)[group_rank(group)]
        own.copy_(src)
        return all_gather_single(flat, own, group=group, async_op=True, log_name=name)

    @staticmethod
    def _start_quantized(
        flat: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        group: ProcessGroup | None,
        parts: int,
        *,
        name: str,
    ) -> _QuantGather:
        mine = _pack(codes, scales).view(-1)
        packed = torch.empty(parts, mine.numel(), dtype=torch.uint8, device=flat.device)
        work = all_gather_single(packed.view(-1), mine, group=group, async_op=True, log_name=name)
        return _QuantGather(work, packed, flat, codes.numel())

    @torch.no_grad()
    def on_release(self, bucket: object) -> None:
        """The full parameters are about to be freed: keep the hpZ secondary partition."""
        b = bucket
        if self.hpz_group is None or not self._on_dp_group(b) or b.index in self.secondary:  # type: ignore[attr-defined]
            return
        flat: torch.Tensor = b.flat  # type: ignore[attr-defined]
        part = flat.view(self.hpz_size, -1)[group_rank(self.hpz_group)]
        if getattr(b, "host_shard", False):
            self.secondary[b.index] = part.to("cpu", copy=True)  # type: ignore[attr-defined]
        else:
            self.secondary[b.index] = part.clone()  # type: ignore[attr-defined]

    @torch.no_grad()
    def modified(self, bucket: object) -> None:
        """A gathered bucket's parameters were edited in place (``GatheredParameters`` with a
        modifier rank): drop its secondary partition, re-quantize a quantized frozen shard."""
        b = bucket
        self.secondary.pop(b.index, None)  # type: ignore[attr-defined]
        if b.index in self.frozen:  # type: ignore[attr-defined]
            lo, hi = b.layout.shard_range(b.rank)  # type: ignore[attr-defined]
            self.store_frozen(b, b.flat[lo:hi])  # type: ignore[attr-defined]

    def invalidate(self, buckets: Sequence[object], trainable_only: bool = True) -> None:
        """Parameters changed (optimizer step, load): drop their secondary partitions."""
        for b in buckets:
            if not trainable_only or getattr(b, "trainable", False):
                self.secondary.pop(b.index, None)  # type: ignore[attr-defined]

    def secondary_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.secondary.values())

    # ---- gradient reduction (qgZ) -------------------------------------------------------
    @torch.no_grad()
    def reduce(self, flat: torch.Tensor, shard_numel: int) -> torch.Tensor:
        """This rank's ``shard_numel`` chunk of the sum over ranks of ``flat`` (fp32), by the
        two-hop int4 all-to-all (see the module docstring)."""
        nodes, local = self.nodes, self.local
        s = shard_numel
        g = flat.view(nodes, local, s)
        # hop 1, inside the node: row l of the send buffer goes to local peer l and holds the
        # chunks of ranks (n, l) for every node n
        send = g.transpose(0, 1).reshape(local, nodes * s)
        if local > 1:
            codes, scales = _quantize(send, GRAD_BITS, GRAD_BLOCK)
            packed = _pack(codes, scales)
            got = torch.empty_like(packed)
            all_to_all_single(got, packed, group=self.intra_group, log_name="qgz_intra_all_to_all")
            r_codes, r_scales = _unpack(got, codes.shape[-1], torch.uint8)
            vals = _dequantize(r_codes, r_scales, GRAD_BITS, GRAD_BLOCK, nodes * s, torch.float32)
            partial = vals.sum(dim=0).view(nodes, s)  # fp32 reduction over the node
        else:
            partial = send.float().view(nodes, s)
        # hop 2, across nodes between ranks of the same local index: row n goes to node n
        codes, scales = _quantize(partial, GRAD_BITS, GRAD_BLOCK)
        packed = _pack(codes, scales)
        got = torch.empty_like(packed)
        all_to_all_single(got, packed, group=self.inter_group, log_name="qgz_inter_all_to_all")
        r_codes, r_scales = _unpack(got, codes.shape[-1], torch.uint8)
        vals = _dequantize(r_codes, r_scales, GRAD_BITS, GRAD_BLOCK, s, torch.float32)
        return vals.sum(dim=0)
