"""What the fault layer needs from the training engine, as a structural type.

The engine builds the fault layer and calls it at each optimizer-step boundary; the fault layer
in turn loads and saves checkpoints and reads step counters through the engine. Typing that
back-reference as a Protocol keeps the dependency one way: the engine imports this package,
this package never imports the engine.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class FaultHost(Protocol):
    """The engine attributes and methods the fault layer uses (DeepSpeedEngine has them)."""

    module: nn.Module
    global_rank: int
    world_size: int
    dp_group: Any
    device: torch.device
    global_steps: int
    micro_steps: int

    def zero_optimization_stage(self) -> int: ...

    def load_checkpoint(self, load_dir: str) -> tuple[str | None, Any]: ...

    def save_checkpoint(self, save_dir: str) -> Any: ...

    def close(self) -> None: ...
