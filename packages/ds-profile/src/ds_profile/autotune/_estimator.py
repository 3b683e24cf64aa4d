"""Device memory a candidate needs, from the model's size and a measured activation footprint.

Per device, with P parameters, N data-parallel ranks, w bytes per weight (2 under fp16/bf16,
else 4) and Adam: weights w*P, gradients w*P, optimizer states (master copy, two moments:
16*P mixed precision, 8*P fp32), the way DeepSpeed's autotuner counts them; stage >= 1 divides
the optimizer states by N, stage >= 2 the gradients, stage 3 the weights; offloading the
optimizer moves its states (and the fp32 gradients it steps on) to the host, offloading
parameters (stage 3) moves the weights there too. Activations are measured by the profile
run (bytes saved for backward at micro-batch 1, with and without checkpointing) and scale
with the micro-batch. A margin covers the allocator's fragmentation and workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_profile.autotune._space import Candidate

MARGIN = 1.15


@dataclass(frozen=True)
class ModelFacts:
    """What the profile run measured (``model_info.json``)."""

    num_params: int
    activation_bytes_per_sample: int
    #: with the user's activation-checkpointing flag on; None when not measured
    checkpointed_activation_bytes_per_sample: int | None
    half_precision: bool
    device_memory_bytes: int


def required_bytes(cand: Candidate, facts: ModelFacts, world: int) -> int:
    p = facts.num_params
    w = 2 if facts.half_precision else 4
    weights, grads = w * p, w * p
    optim = (16 if facts.half_precision else 8) * p
    if cand.stage >= 1:
        optim /= world
    if cand.stage >= 2:
        grads /= world
    if cand.stage >= 3:
        weights /= world
    if cand.offload in ("optimizer", "optimizer+param"):
        optim = 0
    if cand.offload == "optimizer+param":
        weights = 0
    act = facts.activation_bytes_per_sample
    if cand.checkpointing and facts.checkpointed_activation_bytes_per_sample is not None:
        act = facts.checkpointed_activation_bytes_per_sample
    return int(MARGIN * (weights + grads + optim + cand.micro_batch * act))


def fits(cand: Candidate, facts: ModelFacts, world: int, budget_bytes: int) -> bool:
    return required_bytes(cand, facts, world) <= budget_bytes
