"""Validated settings of one MoE layer's router (what the constructor arguments mean)."""

from __future__ import annotations

import dataclasses
import enum


class NoisyGatePolicy(enum.Enum):
    """Noise the router adds while training (never in eval)."""

    #: no noise
    NONE = "none"
    #: multiply the router's input by U(1 - 1e-2, 1 + 1e-2) (Switch Transformer)
    JITTER = "Jitter"
    #: add Gumbel noise to the logits used to *select* experts; weights use clean logits
    RSAMPLE = "RSample"

    @classmethod
    def parse(cls, value: str | NoisyGatePolicy | None) -> NoisyGatePolicy:
        # DeepSpeed's MoE accepts the string "None" as well as None (config files spell it so)
        if value is None or value == "None":
            return cls.NONE
        if isinstance(value, NoisyGatePolicy):
            return value
        for member in cls:
            if member is not cls.NONE and value == member.value:
                return member
        raise ValueError(
            f"noisy_gate_policy={value!r} is not known; use None (or 'None'), 'Jitter' or 'RSample'"
        )


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Everything the router needs; checked once at construction so forward never re-checks.

    ``capacity_factor`` scales the fair share ``k * tokens / num_experts`` into the number of
    slots each expert has per rank and step; ``drop_tokens=False`` removes the limit (dropless).
    """

    num_experts: int
    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: NoisyGatePolicy = NoisyGatePolicy.NONE
    use_rts: bool = True
    router_z_loss_coef: float = 0.0
    #: k = 2 while training: the 2nd expert is the argmax of ``logits + Gumbel noise`` over the
    #: experts other than the 1st (DeepSpeed's ``top2_2nd_expert_sampling``, on by default)
    top2_2nd_expert_sampling: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int):
            raise TypeError(
                f"num_experts={self.num_experts!r} must be an int for one layer; for a pyramid "
                "(a list per layer) build the layers with ds_moe.pyramid_moe_layers(num_experts=[...])"
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.num_experts:
            raise ValueError(
                f"k={self.k!r} must be an int in [1, num_experts={self.num_experts}]: each token "
                "goes to k distinct experts"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a number > 0 (1.0 = fair share)")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"min_capacity={self.min_capacity!r} must be an int >= 0")
        if not isinstance(self.router_z_loss_coef, (int, float)) or self.router_z_loss_coef < 0:
            raise ValueError(
                f"router_z_loss_coef={self.router_z_loss_coef!r} must be a number >= 0 "
                "(0 disables the z-loss; ST-MoE uses 1e-3)"
            )


def check_ep_size(num_experts: int, ep_size: int) -> None:
    """Expert parallelism splits the experts evenly over the ``ep_size`` ranks of a group."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} must be an int >= 1")
    if num_experts % ep_size != 0:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by ep_size={ep_size}: every rank of an "
            "expert-parallel group holds the same number of experts; pick an ep_size that "
            "divides num_experts"
        )


def check_ep_world(ep_size: int, world_size: int) -> None:
    """Expert-parallel groups tile the world."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} must be an int >= 1")
    if world_size % ep_size != 0:
        raise ValueError(
            f"ep_size={ep_size} does not divide the world size {world_size}; expert-parallel "
            "groups are ep_size consecutive ranks, so pick a divisor of the world size"
        )
