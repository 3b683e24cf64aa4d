"""The search space: ZeRO stage x offload x micro-batch size x activation checkpointing, with
gradient accumulation chosen so the global batch stays the user's."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ds_profile.autotune._settings import AutotuneSettings


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration to try. ``offload``: "none", "optimizer" (optimizer states and the
    step on the CPU) or "optimizer+param" (stage 3 parameters on the CPU too)."""

    stage: int
    offload: str
    micro_batch: int
    grad_accum: int
    checkpointing: bool

    @property
    def name(self) -> str:
        off = {"none": "", "optimizer": "_offopt", "optimizer+param": "_offall"}[self.offload]
        ac = "_ac" if self.checkpointing else ""
        return f"z{self.stage}{off}{ac}_mbs{self.micro_batch}_gas{self.grad_accum}"

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "offload": self.offload, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "checkpointing": self.checkpointing}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(int(d["stage"]), str(d["offload"]), int(d["micro_batch"]), int(d["grad_accum"]),
                   bool(d["checkpointing"]))  # fmt: skip


def global_batch(user_config: dict[str, Any], settings: AutotuneSettings, world: int) -> int:
    """The global batch every candidate keeps: the config's train_batch_size, else
    micro x accumulation x world from the config, else max_train_batch_size."""
    tb = user_config.get("train_batch_size")
    if isinstance(tb, int) and tb > 0:
        return tb
    mbs = user_config.get("train_micro_batch_size_per_gpu")
    gas = user_config.get("gradient_accumulation_steps", 1)
    if isinstance(mbs, int) and isinstance(gas, int):
        return mbs * gas * world
    if settings.max_train_batch_size:
        return settings.max_train_batch_size
    raise ValueError(
        "autotuning needs the global batch to keep: set train_batch_size (or "
        "train_micro_batch_size_per_gpu and gradient_accumulation_steps, or "
        "autotuning.max_train_batch_size) in the config"
    )


def micro_batch_sizes(settings: AutotuneSettings, per_rank: int) -> list[int]:
    """Micro-batch sizes that divide the per-rank batch, within the configured bounds (or the
    explicit ``micro_batch_sizes`` list)."""
    if settings.micro_batch_sizes is not None:
        chosen = [m for m in settings.micro_batch_sizes if per_rank % m == 0]
        if not chosen:
            raise ValueError(
                f"autotuning.micro_batch_sizes {list(settings.micro_batch_sizes)}: none divides the "
                f"per-rank batch {per_rank}"
            )
        return sorted(set(chosen))
    lo = settings.min_train_micro_batch_size_per_gpu
    hi = settings.max_train_micro_batch_size_per_gpu
    return [m for m in range(lo, min(hi, per_rank) + 1) if per_rank % m == 0]


def enumerate_space(settings: AutotuneSettings, batch: int, world: int) -> list[Candidate]:
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by the {world} ranks")
    per_rank = batch // world
    out: list[Candidate] = []
    for stage in settings.zero_stages:
        for offload in settings.offload:
            if offload == "optimizer+param" and stage != 3:
                continue  # parameter offload exists only at stage 3
            if offload != "none" and stage == 0:
                continue  # offload needs ZeRO (stage 1 or more)
            for mbs in micro_batch_sizes(settings, per_rank):
                for ac in (False, True) if settings.activation_checkpointing_arg else (False,):
                    out.append(Candidate(stage, offload, mbs, per_rank // mbs, ac))
    return out


def trial_config(user_config: dict[str, Any], cand: Candidate, world: int, settings: AutotuneSettings,
                 metric_path: str) -> dict[str, Any]:  # fmt: skip
    """The user's config with the candidate's batch, ZeRO and offload settings, and an
    ``autotuning`` section telling the engine to measure and exit."""
    cfg = copy.deepcopy(user_config)
    cfg["train_batch_size"] = cand.micro_batch * cand.grad_accum * world
    cfg["train_micro_batch_size_per_gpu"] = cand.micro_batch
    cfg["gradient_accumulation_steps"] = cand.grad_accum
    zero = {k: v for k, v in dict(cfg.get("zero_optimization") or {}).items()
            if k not in ("stage", "offload_optimizer", "offload_param")}  # fmt: skip
    zero["stage"] = cand.stage
    if cand.offload in ("optimizer", "optimizer+param"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cand.offload == "optimizer+param":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg["zero_optimization"] = zero
    cfg["autotuning"] = {
        "enabled": True,
        "start_profile_step": settings.start_profile_step,
        "end_profile_step": settings.end_profile_step,
        "metric_path": metric_path,
    }
    return cfg
