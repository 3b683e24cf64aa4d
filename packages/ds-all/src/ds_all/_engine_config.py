"""``engine.config``: DeepSpeed's engine exposes the config as the dict it was given, and
clients read it that way (``engine.config.get("zero_optimization", {})``, ``config["..."]``).

``EngineConfig`` is that dict (the keys the user set, after validation), and its attributes
are the validated :class:`DeepSpeedConfig`'s (``engine.config.steps_per_print``), which the
engine and the packages wired into it read."""

from __future__ import annotations

from typing import Any

from ds_all._config import DeepSpeedConfig


class EngineConfig(dict):  # type: ignore[type-arg]
    """The config as a dict, with the validated config's attributes."""

    def __init__(self, parsed: DeepSpeedConfig) -> None:
        super().__init__(parsed.model_dump(exclude_unset=True, by_alias=True))
        # zero_optimization is kept as the user wrote it (a free-form section ds_zero validates)
        object.__setattr__(self, "_parsed", parsed)

    @property
    def parsed(self) -> DeepSpeedConfig:
        return object.__getattribute__(self, "_parsed")

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_parsed"), name)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))
