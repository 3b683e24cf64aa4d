"""Base model for config sections: unknown keys are errors that suggest the nearest valid key,
scalar values are checked against the field's type before pydantic's lax conversion (no
booleans for numbers, no quoted numbers, no NaN/Infinity), "auto" (as the Hugging Face
integration writes it) means "use the default" where DeepSpeed's own models say so, and
deprecated aliases warn once and map to the current name."""

from __future__ import annotations

import difflib
import enum
import math
import os
import types
import warnings
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


AUTO = "auto"


def suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(valid))}"


def scalar_kinds(annotation: Any) -> frozenset[type]:
    """The JSON scalar kinds (bool, int, float, str) a field annotation admits, looking through
    Optional/Union/Literal/Annotated; empty for containers and nested models (checked by their
    own validators)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return scalar_kinds(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out: frozenset[type] = frozenset()
        for arg in get_args(annotation):
            out |= scalar_kinds(arg)
        return out
    if origin is Literal:
        return frozenset(type(a) for a in get_args(annotation))
    if annotation in (bool, int, float, str):
        return frozenset({annotation})
    if isinstance(annotation, type) and issubclass(annotation, (str, enum.Enum, os.PathLike)):
        return frozenset({str})
    return frozenset()


def check_scalar(key: str, value: Any, kinds: frozenset[type], non_finite_ok: bool = False) -> None:
    """Refuse what pydantic's lax mode would convert silently: ``true`` for a number (it becomes
    1), ``"0.001"`` for a number, and NaN/Infinity (JSON's extension, which Python's parser
    accepts) where a finite number is expected. ``8.0`` for an integer stays accepted, as
    DeepSpeed accepts it; a fractional value is pydantic's error."""
    numeric = bool(kinds & {int, float})
    if not numeric:
        return
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(
            f"{key}: expected a number, got {str(value).lower()} (a boolean); write the number "
            "itself (JSON true is not 1 here)"
        )
    if isinstance(value, str) and str not in kinds:
        raise ConfigError(
            f"{key}: expected a number, got the string {value!r}; write the number without quotes"
        )
    if isinstance(value, float) and not math.isfinite(value) and not non_finite_ok:
        raise ConfigError(f"{key}: must be a finite number, got {value}")


def find_non_finite(value: Any, key: str) -> None:
    """Refuse NaN/Infinity anywhere inside a free-form value (lists, nested objects)."""
    stack = [(key, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: must be a finite number, got {v}")
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}", x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))


class Section(BaseModel):
    """A config section. Subclasses list ``deprecated = {"old": "new"}`` for renamed keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=False)
    deprecated: ClassVar[dict[str, str]] = {}
    #: keys DeepSpeed knows that this project accepts but does not act on (a warning says so)
    ignored: ClassVar[set[str]] = set()
    #: keys of features DeepSpeed itself has removed and refuses (0.19.8): key -> why, refused
    #: here too whatever their value, since a leftover block would otherwise change nothing
    removed: ClassVar[dict[str, str]] = {}
    #: the section's path in the JSON, for messages ("zero_optimization", "fp16", ...)
    path: ClassVar[str] = ""
    #: fields where NaN/Infinity mean something (DeepSpeed's ``steps_per_print: Infinity``)
    non_finite_ok: ClassVar[frozenset[str]] = frozenset()
    #: True where DeepSpeed's own model for the section drops "auto" (its pydantic sections:
    #: the value falls back to the default); elsewhere "auto" must be resolved by the client
    #: (Trainer, Accelerate) before initialize(), see ``unresolved_auto``
    auto_is_default: ClassVar[bool] = False

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
        fields = {}
        for name, field in cls.model_fields.items():
            valid.add(name)
            fields[name] = field
            if field.alias:
                valid.add(field.alias)
                fields[field.alias] = field
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
            if key in cls.removed:
                raise ConfigError(
                    f"{full}: {cls.removed[key]} (DeepSpeed 0.19.8 refuses it too); remove the key"
                )
            if key in cls.ignored:
                warnings.warn(
                    f"config key {full!r} is accepted but has no effect in ds_all",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            if key not in valid:
                raise ConfigError(f"{full}: unknown key; {suggest(key, sorted(valid))}")
            kinds = scalar_kinds(fields[key].annotation)
            if isinstance(value, str) and value == AUTO and AUTO not in literals(fields[key]):
                continue  # the default stands in for "auto" (unresolved_auto reports it)
            check_scalar(full, value, kinds, key in cls.non_finite_ok)
            out[key] = value
        return out


def literals(field: Any) -> tuple[Any, ...]:
    found: list[Any] = []
    stack = [field.annotation]
    while stack:
        ann = stack.pop()
        if get_origin(ann) is Literal:
            found.extend(get_args(ann))
        else:
            stack.extend(get_args(ann))
    return tuple(found)


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
