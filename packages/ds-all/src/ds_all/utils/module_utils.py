"""``deepspeed.utils.module_utils``: get or set a submodule (or any attribute) by its dotted
name, as ``named_modules()`` spells it (``"encoder.layer.0.attention"``)."""

from __future__ import annotations

from typing import Any


def recursive_getattr(model: Any, module_name: str) -> Any:
    """``model.a.b.c`` for ``module_name == "a.b.c"``."""
    out = model
    for name in module_name.split("."):
        out = getattr(out, name)
    return out


def recursive_setattr(model: Any, module_name: str, module: Any) -> None:
    """Set ``model.a.b.c = module`` for ``module_name == "a.b.c"`` (a child module replaces
    the registered one)."""
    *path, last = module_name.split(".")
    setattr(recursive_getattr(model, ".".join(path)) if path else model, last, module)


__all__ = ["recursive_getattr", "recursive_setattr"]
