"""The config sections ds_offload owns, with DeepSpeed's key names and defaults.

``offload_optimizer`` and ``offload_param`` sit inside ``zero_optimization`` in a DeepSpeed
JSON config; ``aio`` is top level. ds_all composes these models into its config; each can also
be built alone: ``OffloadOptimizerConfig.model_validate({"device": "cpu"})``.
Unknown keys are errors (a misspelt key would otherwise silently disable offload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ds_offload._options import (
    OPTIMIZER_AUTO_KEYS,
    AioOptions,
    OffloadDevice,
    OffloadOptimizerOptions,
    OffloadParamOptions,
    drop_auto,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str) -> Any:
        """Validate ``data``; errors name ``where.key`` and the problem."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            lines = []
            for e in exc.errors():
                key = ".".join(str(p) for p in (where, *e["loc"]))
                lines.append(f"{key}: {e['msg']}")
            raise ValueError("invalid config:\n  " + "\n  ".join(lines)) from None


class AioConfig(_Section):
    """``aio``: the async IO engine's knobs (DeepSpeed: aio section)."""

    block_size: int = Field(1_048_576, gt=0, description="bytes per IO request")
    queue_depth: int = Field(8, gt=0, description="IOs in flight per submitting thread")
    thread_count: int = Field(
        1,
        gt=0,
        validation_alias=AliasChoices("thread_count", "intra_op_parallelism"),
        description="submitting threads (DeepSpeed >= 0.15 calls it intra_op_parallelism)",
    )
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False
    use_direct: bool = Field(True, description="O_DIRECT for aligned IO (ds_offload extension)")

    def to_options(self) -> AioOptions:
        return AioOptions(**self.model_dump(exclude={"use_gds"}))

    @model_validator(mode="after")
    def _no_gds(self) -> AioConfig:
        if self.use_gds:
            raise ValueError(
                "use_gds=true (GPUDirect Storage) is not supported by ds_offload; set it to false"
            )
        return self


class _OffloadBase(_Section):
    # keys whose "auto" is a value of their own; any other key's "auto" means its default, as
    # in DeepSpeed's pydantic models (the Hugging Face integration writes "auto")
    _auto_keys: ClassVar[frozenset[str]] = frozenset()

    device: OffloadDevice = OffloadDevice.none
    nvme_path: Path | None = None
    pin_memory: bool = Field(True, description="page-locked host buffers (DeepSpeed 0.19.8: true)")

    @model_validator(mode="before")
    @classmethod
    def _auto_is_default(cls, data: Any) -> Any:
        return drop_auto(data, cls._auto_keys) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _nvme_needs_path(self) -> _OffloadBase:
        if self.device is OffloadDevice.nvme and self.nvme_path is None:
            raise ValueError(
                "device is 'nvme' but nvme_path is not set; set nvme_path to a directory on the "
                "NVMe drive (e.g. /local_nvme)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.device is not OffloadDevice.none


class OffloadOptimizerConfig(_OffloadBase):
    """``zero_optimization.offload_optimizer``: fp32 master weights and optimizer states on
    the CPU or NVMe, stepped by a CPU optimizer."""

    _auto_keys: ClassVar[frozenset[str]] = OPTIMIZER_AUTO_KEYS
    buffer_count: int = Field(4, ge=0, description="NVMe: swap buffers (partitions in flight)")
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    ratio: float | Literal["auto"] = Field(
        1.0,
        description="DeepSpeed's fraction of the optimizer state offloaded to the CPU (the last "
        'part of the model; the rest is stepped on the device); "auto" (ds_offload '
        "extension): chosen from the free device memory at setup",
    )
    max_in_cpu: int = Field(
        0,
        ge=0,
        description="ds_offload extension, device nvme: elements of optimizer partitions kept "
        "in CPU memory (the first partitions), the rest swapped to nvme_path",
    )
    num_threads: int = Field(
        0,
        ge=0,
        description="ds_offload extension: CPU optimizer threads of this process (0: its share "
        "of the usable cores; OMP_NUM_THREADS when above 1)",
    )

    overlap: bool = Field(
        True,
        description="ds_offload extension: CPU updates on a worker thread, the next forward "
        "starts on each partition once it is updated (exact); false: step() returns when done",
    )
    delayed_update: bool = Field(
        False,
        description="ds_offload extension: one-step-delayed parameter update (ZeRO-Offload DPU); "
        "changes the math: each forward/backward uses the parameters before the previous update",
    )
    exact_16bit_grads: bool = Field(
        True,
        description="ds_offload extension: host gradient buffers in the 16-bit compute dtype "
        "where the caller hands gradients over exactly in it (one rank, one micro-step per "
        "step; same update bits, half the copy and read); false: fp32 buffers always",
    )
    super_offload: bool = Field(
        False, description="DeepSpeed SuperOffload: here the overlapped exact step (the default)"
    )
    cpuadam_cores_perc: float = Field(
        0.8, ge=0.0, le=1.0, description="with super_offload: share of the cores for CPU Adam"
    )

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.0 <= float(value) <= 1.0:
            raise ValueError('ratio must be in [0, 1] or "auto"')
        return value

    @model_validator(mode="after")
    def _delayed_needs_cpu(self) -> OffloadOptimizerConfig:
        if self.delayed_update and self.device is not OffloadDevice.cpu:
            raise ValueError(
                "delayed_update needs device 'cpu': the delayed update keeps a second "
                "low-precision copy of the parameters in host memory, which NVMe offload exists "
                "to avoid; set device to 'cpu' or remove delayed_update"
            )
        return self

    @property
    def pipeline(self) -> bool:
        return self.pipeline_read or self.pipeline_write

    def to_options(self) -> OffloadOptimizerOptions:
        return OffloadOptimizerOptions(**self.model_dump())


class OffloadParamConfig(_OffloadBase):
    """``zero_optimization.offload_param``: stage-3 parameters on the CPU or NVMe, prefetched
    into bounded device buffers."""

    buffer_count: int = Field(5, ge=0, description="NVMe: host buffers for parameters in flight")
    buffer_size: int = Field(100_000_000, ge=0, description="NVMe: elements per host buffer")
    max_in_cpu: int = Field(
        1_000_000_000, ge=0, description="NVMe: elements kept in CPU memory before swapping"
    )

    def to_options(self) -> OffloadParamOptions:
        return OffloadParamOptions(**self.model_dump())
