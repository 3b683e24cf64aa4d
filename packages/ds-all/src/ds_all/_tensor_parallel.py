"""The ``tensor_parallel`` section (DeepSpeed's AutoTP training keys) and the engine's
tensor-parallel setup: groups, sharding with ds-tp, and what ZeRO needs to know.

DeepSpeed's rules for where the tensor-parallel size and group come from are kept: the config's
``autotp_size`` is canonical, ``tp_model_init`` only records arguments (a mismatch with the
config is an error), and an ``mpu`` with tensor-model-parallel groups supplies the groups
instead of building new ones (``tp_model_init(tp_group=...)`` with an ``mpu`` is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import nn

from ds_all._config_base import ConfigError, Section

#: what tp_model_init records on the model (DeepSpeed records it in a module global)
_RECORD = "ds_tp_model_init_args"


class TPSubsection(Section):
    """``tensor_parallel.tp`` (DeepSpeed's ``TPConfig``)."""

    path = "tensor_parallel.tp"
    tp_size: int = 1
    tp_grain_size: int = 1
    mpu: Any = None
    tp_group: Any = None


class TensorParallelSection(Section):
    """DeepSpeed 0.19.8's ``TPTrainingConfig`` keys and defaults."""

    path = "tensor_parallel"
    dtype: Any = torch.float16
    #: 0 (or 1): no tensor parallelism
    autotp_size: int = 0
    tp_overlap_comm: bool = False
    vocab_parallel_lm_head: bool | None = None
    vocab_parallel_ce_backend: Literal["torch", "liger"] = "torch"
    tensor_parallel: TPSubsection = Field(default_factory=TPSubsection, alias="tp")
    injection_policy_tuple: Any = None
    partition_config: dict[str, Any] | None = None
    preset_model: str | None = None
    keep_module_on_host: bool = False
    replace_with_kernel_inject: bool = Field(False, alias="kernel_inject")

    @field_validator("autotp_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 0:
            raise ConfigError(f"tensor_parallel.autotp_size must be >= 0 (0: disabled), got {v}")
        return v

    def check_supported(self) -> None:
        """Refuse what is accepted by DeepSpeed but not implemented here, saying why."""
        if self.tp_overlap_comm:
            raise ConfigError(
                "tensor_parallel.tp_overlap_comm: overlapping the tensor-parallel all-reduce with "
                "computation is not implemented; set it to false"
            )
        if self.vocab_parallel_lm_head:
            raise ConfigError(
                "tensor_parallel.vocab_parallel_lm_head: AutoTP keeps the LM head replicated here; "
                "set it to null or false (or use ds_tp.VocabParallelEmbedding and "
                "ds_tp.vocab_parallel_cross_entropy in the model)"
            )
        if self.vocab_parallel_ce_backend != "torch":
            raise ConfigError(
                "tensor_parallel.vocab_parallel_ce_backend 'liger' is not supported; use 'torch'"
            )
        if self.replace_with_kernel_inject or self.injection_policy_tuple is not None:
            raise ConfigError(
                "tensor_parallel.replace_with_kernel_inject / injection_policy_tuple are "
                "inference-kernel options; AutoTP training takes partition_config or preset_model"
            )
        tp = self.tensor_parallel.tp_size
        if tp not in (1, self.autotp_size):
            raise ConfigError(
                f"tensor_parallel.tp.tp_size ({tp}) does not match tensor_parallel.autotp_size "
                f"({self.autotp_size}); leave tp.tp_size at 1 or make them equal"
            )
        if self.partition_config is not None:
            import ds_tp

            try:
                ds_tp.AutoTPConfig.from_dict(self.partition_config)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.preset_model is not None:
            import ds_tp

            if self.preset_model.lower() not in ds_tp.PRESETS:
                raise ConfigError(
                    f"tensor_parallel.preset_model {self.preset_model!r} is not a preset; choose "
                    f"one of {list(ds_tp.PRESETS)} or give partition_config"
                )


def tp_model_init(
    model: nn.Module,
    tp_size: int,
    dtype: torch.dtype,
    config: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """DeepSpeed's ``deepspeed.tp_model_init``: record the tensor-parallel arguments on the
    model; ``initialize()`` shards it (merging them with the config's ``tensor_parallel``
    section; a conflicting size is an error). Returns the model unchanged."""
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(f"tp_model_init: tp_size must be a positive int, got {tp_size!r}")
    unknown = sorted(set(kwargs) - {"tp_group"})
    if unknown:
        raise ConfigError(f"tp_model_init: unknown keyword arguments {unknown}; it takes tp_group")
    setattr(model, _RECORD, {"tp_size": tp_size, "dtype": dtype, "config": config,
                             "tp_group": kwargs.get("tp_group")})  # fmt: skip
    return model


@dataclass
class TensorParallelSetup:
    """What the engine keeps: the groups (an mpu) and the size."""

    groups: Any
    size: int

    @property
    def tp_group(self) -> Any:
        return self.groups.get_tensor_model_parallel_group()

    @property
    def dp_group(self) -> Any:
        return self.groups.get_data_parallel_group()


def _groups_from(size: int, mpu: Any, tp_group: Any) -> Any:
    import ds_tp

    if tp_group is not None:
        if mpu is not None:
            raise ConfigError(
                "tp_model_init(tp_group=...) and initialize(mpu=...) both give a tensor-parallel "
                "group; pass only one"
            )
        if dist.get_world_size(tp_group) != size:
            raise ConfigError(
                f"tp_model_init's tp_group has {dist.get_world_size(tp_group)} ranks but the "
                f"tensor-parallel size is {size}"
            )
        # the data-parallel group: the ranks at this position of every tensor-parallel group
        world = dist.get_world_size()
        groups = ds_tp.build_tensor_parallel_groups(size)
        if (
            sorted(dist.get_process_group_ranks(tp_group))
            != sorted(dist.get_process_group_ranks(groups.tp_group))
            and size != world
        ):
            raise ConfigError(
                "tp_model_init's tp_group must hold consecutive ranks [i * tp, (i + 1) * tp) "
                "(DeepSpeed's mesh); pass an mpu for another layout"
            )
        return groups
    if mpu is not None and callable(getattr(mpu, "get_tensor_model_parallel_group", None)):
        have = mpu.get_tensor_model_parallel_world_size()
        if have != size:
            raise ConfigError(
                f"tensor_parallel.autotp_size is {size} but the mpu's tensor-model-parallel "
                f"world size is {have}; make them equal"
            )
        return mpu
    return ds_tp.build_tensor_parallel_groups(size)


def setup_tensor_parallel(model: nn.Module, cfg: Any, mpu: Any) -> TensorParallelSetup | None:
    """Shard ``model`` (in place) when the config or ``tp_model_init`` asks for tensor
    parallelism; None otherwise."""
    section: TensorParallelSection = cfg.tensor_parallel
    record = getattr(model, _RECORD, None)
    size = section.autotp_size
    if record is not None:
        if size > 1 and record["tp_size"] != size:
            raise ConfigError(
                f"tp_model_init(tp_size={record['tp_size']}) does not match "
                f"tensor_parallel.autotp_size {size}; make them equal or drop one"
            )
        if size <= 1:
            if record["tp_group"] is None and mpu is None:
                raise ConfigError(
                    "tp_model_init was called but there is no tensor-parallel group source: add "
                    '"tensor_parallel": {"autotp_size": N} to the config, or pass tp_group= to '
                    "tp_model_init, or an mpu to initialize()"
                )
            size = record["tp_size"]
    if size <= 1:
        return None
    section.check_supported()
    zero_stage = cfg.zero_config().stage
    if zero_stage == 3:
        raise ConfigError(
            "tensor_parallel.autotp_size > 1 with zero_optimization.stage 3: stage 3 would gather "
            "and re-partition the tensor-parallel shards as if they were whole parameters (and "
            "checkpoint them as such); use stage 0, 1 or 2 with tensor parallelism"
        )
    if dist.get_world_size() % size:
        raise ConfigError(
            f"tensor_parallel.autotp_size {size} does not divide the world size "
            f"{dist.get_world_size()}"
        )
    # DeepSpeed's tensor_parallel.tp.{mpu, tp_group} (dict configs can carry the objects)
    sub = section.tensor_parallel
    tp_group = (record["tp_group"] if record else None) or sub.tp_group
    groups = _groups_from(size, mpu if mpu is not None else sub.mpu, tp_group)
    import ds_tp

    if not getattr(model, "ds_autotp_parsed", False):
        try:
            ds_tp.autotp(
                model, groups.get_tensor_model_parallel_group(),
                partition_config=section.partition_config, preset_model=section.preset_model,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"tensor_parallel: {e}") from None
    mark_replicated(model, size)
    check_first_inputs(model, groups.get_tensor_model_parallel_group())
    if cfg.activation_checkpointing.partition_activations:
        # ds_all.checkpointing.checkpoint keeps 1/tp of each checkpointed input per rank
        from ds_all import checkpointing

        checkpointing.configure(mpu_=groups, deepspeed_config=cfg)
    return TensorParallelSetup(groups, size)


def mark_replicated(model: nn.Module, size: int) -> None:
    """Parameters every tensor-parallel rank holds whole count once in the clipping norm
    (ZeRO adds squared norms over the tensor-parallel group)."""
    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.ds_norm_replicas = size  # type: ignore[attr-defined]


def mpu_norm_group(model: nn.Module, mpu: Any) -> Any:
    """With a Megatron-style mpu whose tensor-model-parallel size is > 1 (a model built from
    tensor-parallel layers by the script): the group over which ZeRO adds squared gradient
    norms, with replicated parameters marked to count once. None otherwise."""
    if mpu is None:
        return None
    get = getattr(mpu, "get_tensor_model_parallel_world_size", None)
    size = get() if callable(get) else 1
    if size <= 1 or not callable(getattr(mpu, "get_tensor_model_parallel_group", None)):
        return None
    if not any(getattr(p, "tensor_model_parallel", False) for p in model.parameters()):
        return None  # nothing sharded: the model-parallel ranks hold separate models
    group = mpu.get_tensor_model_parallel_group()
    mark_replicated(model, size)
    return group


@dataclass
class TPCheckpoint:
    """Checkpoint fragments of a tensor-parallel model as pieces of the full tensors (ds-tp's
    layouts), so the checkpoint loads at any tensor-parallel size with no conversion."""

    shards: dict[str, Any]
    tp_rank: int

    def for_save(self, fragments: list[Any]) -> list[Any]:
        # replicated state (norms, buffers, step counters) is written by tensor-parallel rank 0
        # only: a checkpoint holds every element once
        import ds_tp

        return ds_tp.full_tensor_fragments(
            fragments, self.shards, keep_replicated=self.tp_rank == 0
        )

    def for_load(self, fragments: list[Any]) -> list[Any]:
        import ds_tp

        return ds_tp.full_tensor_fragments(fragments, self.shards)


def tp_checkpoint(module: nn.Module, mpu: Any) -> TPCheckpoint | None:
    """The rewriting for a model with tensor-parallel parameters; None without any."""
    get = getattr(mpu, "get_tensor_model_parallel_world_size", None)
    if not callable(get) or get() <= 1:
        return None
    import ds_tp

    shards = ds_tp.shard_layouts(module)
    return TPCheckpoint(shards, mpu.get_tensor_model_parallel_rank()) if shards else None


def _digest(value: Any) -> list[float]:
    """Shape and sums of every tensor in a (nested) batch: equal batches, equal digests."""
    out: list[float] = []
    if isinstance(value, torch.Tensor):
        t = value.detach().double()
        out += [
            float(value.numel()),
            *map(float, value.shape),
            float(t.sum()),
            float((t * t).sum()),
        ]
    elif isinstance(value, (list, tuple)):
        for v in value:
            out += _digest(v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            out += _digest(value[k])
    return out


def check_first_inputs(model: nn.Module, tp_group: Any) -> None:
    """As DeepSpeed's AutoTP engine: the first forward checks that every rank of the
    tensor-parallel group got the same batch (each computes a slice of the same step; different
    batches would train silently wrong). One all-gather of a few numbers, once."""

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        handle.remove()
        mine = _digest([list(args), kwargs])
        world = dist.get_world_size(tp_group)
        digests: list[Any] = [None] * world
        dist.all_gather_object(digests, mine, group=tp_group)
        if any(d != digests[0] for d in digests):
            raise RuntimeError(
                "tensor parallelism: the ranks of a tensor-parallel group got different batches "
                "in their first forward; every rank of the group must read the same data (shard "
                "the data over the data-parallel group: engine.mpu.get_data_parallel_rank())"
            )

    handle = model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
