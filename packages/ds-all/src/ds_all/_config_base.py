"""Base model for config sections: unknown keys are errors that suggest the nearest valid key,
"auto" (as the Hugging Face integration writes it) means "use the default", and deprecated
aliases warn once and map to the current name."""

from __future__ import annotations

import difflib
import warnings
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


AUTO = "auto"


def suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(valid))}"


class Section(BaseModel):
    """A config section. Subclasses list ``deprecated = {"old": "new"}`` for renamed keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=False)
    deprecated: ClassVar[dict[str, str]] = {}
    #: keys DeepSpeed knows that this project accepts but does not act on (a warning says so)
    ignored: ClassVar[set[str]] = set()
    #: the section's path in the JSON, for messages ("zero_optimization", "fp16", ...)
    path: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            if data is None:
                return {}
            where = cls.path or "config"
            raise ConfigError(
                f"{where}: expected a JSON object, got {type(data).__name__} {data!r}"
            )
        out: dict[str, Any] = {}
        valid = set()
        for name, field in cls.model_fields.items():
            valid.add(name)
            if field.alias:
                valid.add(field.alias)
        for key, value in data.items():
            full = f"{cls.path}.{key}" if cls.path else key
            if key in cls.deprecated:
                new = cls.deprecated[key]
                warnings.warn(
                    f"config key {full!r} is deprecated; use {new!r}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                if new in data:
                    raise ConfigError(
                        f"{full} and its replacement {new} are both set; keep only {new!r}"
                    )
                key = new
            if key in cls.ignored:
                warnings.warn(
                    f"config key {full!r} is accepted but has no effect in ds_all",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            if key not in valid:
                raise ConfigError(f"{full}: unknown key; {suggest(key, sorted(valid))}")
            if isinstance(value, str) and value == AUTO:
                continue  # the default stands in for "auto"
            out[key] = value
        return out


def validate_section(model: type[Section], data: Any) -> Section:
    """Validate, turning pydantic's errors into one ConfigError naming each bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            full = ".".join(p for p in (model.path, loc) if p)
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, ConfigError):
                lines.append(str(ctx_err))
            else:
                lines.append(f"{full or model.path}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("; ".join(lines)) from None
