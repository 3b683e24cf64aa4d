"""ZeRO-3 leaf modules: DeepSpeed's ``_z3_leaf`` flag on module instances.

ds_zero reads the flag: a flagged module is gathered as one piece (none of its sub-modules
becomes a stage-3 unit of its own), which Mixture-of-Experts blocks need because they run only
some of their experts per batch."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_FLAG = "_z3_leaf"


def z3_leaf_module(model: nn.Module) -> bool:
    """Whether ``model`` is flagged as a leaf."""
    return bool(getattr(model, _FLAG, False))


def get_z3_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The flagged modules of ``model``."""
    return [m for m in model.modules() if z3_leaf_module(m)]


def set_z3_leaf_module(model: nn.Module, flag: bool) -> None:
    setattr(model, _FLAG, flag)


def _matches(module: nn.Module, cls: type | str) -> bool:
    if isinstance(cls, type):
        return isinstance(module, cls)
    kind = type(module)
    return cls in (kind.__name__, f"{kind.__module__}.{kind.__qualname__}")


def _set(
    model: nn.Module, classes: Sequence[type | str], flag: bool, raise_if_not_found: bool
) -> list[nn.Module]:
    bad = [c for c in classes if not isinstance(c, (type, str))]
    if bad:
        raise TypeError(f"leaf_module_classes must be classes or class names, got {bad!r}")
    hits = [m for m in model.modules() if any(_matches(m, c) for c in classes)]
    for m in hits:
        set_z3_leaf_module(m, flag)
    if not hits and raise_if_not_found:
        raise ValueError(f"no module of {list(classes)!r} found in {type(model).__name__}")
    return hits


def set_z3_leaf_modules(
    model: nn.Module, leaf_module_classes: Sequence[type | str], raise_if_not_found: bool = True
) -> list[nn.Module]:
    """Flag every instance of ``leaf_module_classes`` (classes, or class names) in ``model``."""
    return _set(model, leaf_module_classes, True, raise_if_not_found)


def unset_z3_leaf_modules(
    model: nn.Module, leaf_module_classes: Sequence[type | str], raise_if_not_found: bool = True
) -> list[nn.Module]:
    return _set(model, leaf_module_classes, False, raise_if_not_found)


__all__ = [
    "get_z3_leaf_modules",
    "set_z3_leaf_module",
    "set_z3_leaf_modules",
    "unset_z3_leaf_modules",
    "z3_leaf_module",
]
