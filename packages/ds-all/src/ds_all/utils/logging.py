"""``deepspeed.utils.logging``: the engine's logger and ``log_dist``.

``logger`` is the ``ds_all`` logger the engine writes to, so ``logger.setLevel(...)`` (as
Hugging Face Trainer does with ``log_level``) quiets or opens the engine's own lines."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch.distributed as dist

logger = logging.getLogger("ds_all")

_LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
    "error": logging.ERROR, "critical": logging.CRITICAL,
}  # fmt: skip


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def log_dist(message: str, ranks: Iterable[int] | None = None, level: int = logging.INFO) -> None:
    """Log ``message`` on the listed ranks (default: rank 0; ``[-1]``: every rank)."""
    wanted = list(ranks) if ranks is not None else [0]
    rank = _rank()
    if -1 in wanted or rank in wanted:
        logger.log(level, "[Rank %d] %s", rank, message)


def set_log_level_from_string(log_level: str, custom_logger: logging.Logger | None = None) -> None:
    """Set the level by name (debug, info, warning, error, critical)."""
    level = _LEVELS.get(log_level.lower())
    if level is None:
        raise ValueError(f"log level {log_level!r}: use one of {', '.join(_LEVELS)}")
    (custom_logger or logger).setLevel(level)


__all__ = ["log_dist", "logger", "set_log_level_from_string"]
