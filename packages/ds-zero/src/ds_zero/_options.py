"""Runtime options of a ZeRO-wrapped model: a plain frozen dataclass (no pydantic needed at run
time; ``ZeroConfig`` converts DeepSpeed's JSON section into it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ds_zero._loss_scaler import LossScaleOptions

UnitPolicy = Callable[[nn.Module], bool]


@dataclass(frozen=True)
class ZeroOptions:
    """What to partition and how to communicate.

    stage: 0 = data parallel (gradients all-reduced); 1 = optimizer state partitioned;
        2 = gradients reduce-scattered into partitions; 3 = parameters partitioned too.
    param_dtype: compute dtype of the model's parameters (bf16/fp16 keep fp32 master weights in
        the optimizer partition); None keeps the model's dtype.
    reduce_dtype: dtype in which gradients are communicated and accumulated.
    reduce_bucket_size: elements per gradient bucket (stages 0-2, stage-3 persistent params).
    param_persistence_threshold: stage 3 keeps parameters with at most this many elements whole.
    prefetch_bucket_size: stage 3 prefetches the next unit only if it has at most this many
        elements (0 disables prefetch).
    model_persistence_threshold: stage 3 bound on the total elements kept whole by
        ``param_persistence_threshold`` (DeepSpeed's ``stage3_model_persistence_threshold``):
        parameters are considered in registration order and one that would exceed it is
        partitioned instead.
    max_live_parameters: stage 3 bound on gathered elements; a prefetch that would exceed it is
        skipped (a unit needed now is always gathered).
    max_reuse_distance: stage 3 keeps the last unit of forward gathered for backward when it has at
        most this many elements.
    stage3_units: which modules are stage-3 gather units; default: the children of every
        ``nn.ModuleList`` (transformer blocks) plus the root.
    gradient_accumulation_steps: micro-steps per optimizer step; stages 0 and 1 communicate only
        on the last micro-step.
    gradient_clipping: clip by global norm (0 disables).
    overlap_comm: False waits for each bucket's reduction before backward continues.
    max_inflight_reductions: bucket reductions in flight at once (bounds buffer memory).
    loss_scaling: fp16 loss scaling (None = no scaling).
    align: parameter start alignment in elements inside flat buffers.
    host_param_shards: stage 3 keeps each rank's compute-dtype parameter shard in host memory
        (ZeRO-Offload's ``offload_param: {device: cpu}``): the device holds parameters only
        while their unit is gathered; each gather first copies the shard to the device.
    pin_param_shards: page-lock those host shards (asynchronous copies), when a device exists.
    quantized_weights: ZeRO++ qwZ (DeepSpeed's ``zero_quantized_weights``): stage-3 parameter
        all-gathers carry block-wise int8 codes and fp32 scales, dequantized on arrival.
    quantized_nontrainable_weights: qwZ for frozen parameters only, whose shards are also
        stored quantized (``zero_quantized_nontrainable_weights``).
    quantized_gradients: ZeRO++ qgZ (``zero_quantized_gradients``): stage-3 gradient
        reduce-scatters become int4 all-to-alls, inside each node then across nodes.
    hpz_partition_size: ZeRO++ hpZ (``zero_hpz_partition_size``): >1 keeps a secondary copy of
        the parameters partitioned over groups of that many consecutive ranks, so gathers after
        the forward stay inside the group.
    ranks_per_node: ranks of one node for qgZ's hierarchy (None: ``LOCAL_WORLD_SIZE``, else the
        accelerator's device count).
    """

    stage: int = 0
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype = torch.float32
    reduce_bucket_size: int = 50_000_000
    overlap_comm: bool = True
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = sys.maxsize
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    stage3_units: UnitPolicy | tuple[type[nn.Module], ...] | None = None
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    loss_scaling: LossScaleOptions | None = None
    align: int = 16
    max_inflight_reductions: int = 2
    host_param_shards: bool = False
    pin_param_shards: bool = True
    quantized_weights: bool = False
    quantized_nontrainable_weights: bool = False
    quantized_gradients: bool = False
    hpz_partition_size: int = 1
    ranks_per_node: int | None = None

    @property
    def zeropp(self) -> bool:
        """Whether any ZeRO++ feature is on."""
        return (
            self.quantized_weights
            or self.quantized_nontrainable_weights
            or self.quantized_gradients
            or self.hpz_partition_size > 1
        )

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeroOptions.stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.model_persistence_threshold < 0:
            raise ValueError(
                "ZeroOptions.model_persistence_threshold must be >= 0, got "
                f"{self.model_persistence_threshold}"
            )
        for name in ("reduce_bucket_size", "gradient_accumulation_steps", "align"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZeroOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.gradient_clipping < 0:
            raise ValueError(
                f"ZeroOptions.gradient_clipping must be >= 0, got {self.gradient_clipping}"
            )
        if self.param_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"ZeroOptions.param_dtype must be None, float32, bfloat16 or float16, got "
                f"{self.param_dtype}"
            )
        if self.reduce_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"ZeroOptions.reduce_dtype must be a float dtype, got {self.reduce_dtype}"
            )
        if self.max_inflight_reductions < 1:
            raise ValueError("ZeroOptions.max_inflight_reductions must be >= 1")
        if self.hpz_partition_size < 0:
            raise ValueError(
                f"ZeroOptions.hpz_partition_size (zero_hpz_partition_size) must be >= 0, got "
                f"{self.hpz_partition_size}"
            )
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ZeroOptions.ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.zeropp and self.stage != 3:
            on = [
                key
                for key, value in (
                    ("zero_quantized_weights", self.quantized_weights),
                    ("zero_quantized_nontrainable_weights", self.quantized_nontrainable_weights),
                    ("zero_quantized_gradients", self.quantized_gradients),
                    ("zero_hpz_partition_size", self.hpz_partition_size > 1),
                )
                if value
            ]
            raise ValueError(
                f"{', '.join(on)} (ZeRO++) need stage 3, got stage {self.stage}: set "
                '"stage": 3 or remove them (DeepSpeed ignores them below stage 3)'
            )
        if self.host_param_shards and self.stage != 3:
            raise ValueError(
                f"ZeroOptions.host_param_shards needs stage 3 (parameters partitioned), got stage "
                f"{self.stage}; parameter offload (offload_param) is a ZeRO-3 feature"
            )
