"""Reading a DeepSpeed JSON config file the way DeepSpeed does, with errors that name the file.

DeepSpeed parses files with an ``object_pairs_hook`` that refuses a key given twice in one
object (at any depth), where plain ``json`` would keep the last value silently. Nesting is
bounded before anything recurses over the data, so a pathological file is a ConfigError
instead of a RecursionError from the parser or the validators.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ds_all._config_base import ConfigError

#: deepest legitimate DeepSpeed configs (data_efficiency's curriculum metrics) nest about 7
#: objects; far below Python's recursion limit, which the parser and pydantic both recurse on
MAX_DEPTH = 32


class _Object(dict):  # type: ignore[type-arg]
    """A parsed JSON object that remembers the keys it was given more than once."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    obj.duplicates = []
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and key not in obj.duplicates:
                obj.duplicates.append(key)
            seen.add(key)
    return obj


def check_depth(data: Any, where: str) -> None:
    """ConfigError when objects/lists nest deeper than MAX_DEPTH (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if not isinstance(value, (dict, list, tuple)):
            continue
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}: nested more than {MAX_DEPTH} levels deep; a DeepSpeed config is a few "
                "levels of sections and keys: check the file was written by a config tool"
            )
        stack.extend((c, depth + 1) for c in children)


def _plain(value: Any, path: str, file: str) -> Any:
    """Plain dicts and lists again, refusing the first duplicated key (depth already bounded)."""
    if isinstance(value, dict):
        dups = getattr(value, "duplicates", [])
        if dups:
            key = f"{path}.{dups[0]}" if path else dups[0]
            raise ConfigError(
                f"config file {file!r}: key {key!r} is given more than once in the same object "
                "(JSON would keep only the last value; DeepSpeed refuses duplicate keys too); "
                "keep one of them"
            )
        return {k: _plain(v, f"{path}.{k}" if path else k, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{path}[{i}]", file) for i, v in enumerate(value)]
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ConfigError naming the file for anything else."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {file!r} cannot be read: {e}") from None
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {file!r} is not valid JSON: line {e.lineno} "
                          f"column {e.colno}: {e.msg}") from None  # fmt: skip
    except RecursionError:
        raise ConfigError(
            f"config file {file!r}: nested more than {MAX_DEPTH} levels deep (too deep to parse); "
            "a DeepSpeed config is a few levels of sections and keys"
        ) from None
    check_depth(data, f"config file {file!r}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {file!r} must hold a JSON object ({{...}}), not {type(data).__name__}"
        )
    return _plain(data, "", file)
