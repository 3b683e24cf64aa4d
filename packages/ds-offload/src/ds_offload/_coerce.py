"""Options from whatever a caller passes: an options instance, a pydantic config model or a
plain dict. This sits above both ``_options`` (plain dataclasses) and ``_config`` (pydantic
models), so neither of those imports the other's higher layer; pydantic stays optional."""

from __future__ import annotations

import dataclasses
from typing import Any

from ds_offload._options import (
    OPTIMIZER_AUTO_KEYS,
    AioOptions,
    OffloadOptimizerOptions,
    OffloadParamOptions,
    drop_auto,
)

try:  # pydantic is optional: without it, dict sections are validated by the dataclasses alone
    from ds_offload import _config
except ImportError:
    _config = None  # type: ignore[assignment]

_ALIASES = {"intra_op_parallelism": "thread_count"}


def coerce(cls: type, section: Any, where: str) -> Any:
    """Options of type ``cls`` from: an instance, a pydantic config model (``to_options``),
    or a dict (validated by the pydantic model when pydantic is installed, else here)."""
    if section is None:
        section = {}
    if isinstance(section, cls):
        return section
    if hasattr(section, "to_options"):
        return section.to_options()
    if not isinstance(section, dict):
        raise TypeError(f"{where}: expected a dict or {cls.__name__}, got {type(section).__name__}")
    if _config is None:  # no pydantic: validate here
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {_ALIASES.get(k, k): v for k, v in section.items()}
        if cls is not AioOptions:  # "auto" means the default there, as in DeepSpeed
            data = drop_auto(
                data, OPTIMIZER_AUTO_KEYS if cls is OffloadOptimizerOptions else frozenset()
            )
        unknown = sorted(set(data) - fields - {"use_gds"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}"
            ) from None
        if data.pop("use_gds", False):
            raise ValueError(f"{where}.use_gds=true is not supported; set it to false") from None
        return cls(**data)
    model = {
        AioOptions: _config.AioConfig,
        OffloadOptimizerOptions: _config.OffloadOptimizerConfig,
        OffloadParamOptions: _config.OffloadParamConfig,
    }[cls]
    return model.from_dict(section, where).to_options()
