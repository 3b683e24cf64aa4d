"""ZeRO-3 leaf modules: DeepSpeed's ``_z3_leaf`` flag on module instances.

ds_zero reads the flag: a flagged module is gathered as one piece (none of its sub-modules
becomes a stage-3 unit of its own), which Mixture-of-Experts blocks need because they run only
some of their experts per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ds_all.utils.logging import logger

_FLAG = "_z3_leaf"


def z3_leaf_module(model: nn.Module) -> bool:
    """Whether ``model`` is flagged as a leaf."""
    return bool(getattr(model, _FLAG, False))


def z3_leaf_parameter(param: nn.Parameter) -> bool:
    """Whether ``param`` belongs to a leaf module (ZeRO-3 marks them when it wraps the model:
    ``param.ds_z3_leaf_module`` is that module)."""
    return getattr(param, "ds_z3_leaf_module", None) is not None


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


def set_z3_leaf_modules_by_name(
    model: nn.Module, module_names: Sequence[str], flag: bool = True,
    raise_if_not_found: bool = True,
) -> tuple[list[nn.Module], list[str]]:  # fmt: skip
    """Flag (or, with ``flag=False``, unflag) the modules of ``model`` named ``module_names``
    (as ``named_modules()`` names them). Returns the modules found and the names not found;
    names not found raise a ValueError unless ``raise_if_not_found`` is False."""
    by_name = dict(model.named_modules())
    found = [by_name[n] for n in module_names if n in by_name]
    missing = [n for n in module_names if n not in by_name]
    if missing and raise_if_not_found:
        raise ValueError(f"no module named {missing} in {type(model).__name__}")
    for m in found:
        set_z3_leaf_module(m, flag)
    return found, missing


def set_z3_leaf_modules_by_suffix(
    model: nn.Module, module_name_suffixes: Sequence[str], flag: bool = True,
    raise_if_not_found: bool = True,
) -> tuple[list[nn.Module], list[str]]:  # fmt: skip
    """Flag (or unflag) every module of ``model`` whose ``named_modules()`` name ends with one
    of ``module_name_suffixes``. Returns the modules found (each once) and the suffixes that
    matched none (a ValueError unless ``raise_if_not_found`` is False)."""
    named = list(model.named_modules())
    found: dict[int, nn.Module] = {}
    missing = []
    for suffix in module_name_suffixes:
        hits = [m for name, m in named if name.endswith(suffix)]
        if not hits:
            missing.append(suffix)
        found.update((id(m), m) for m in hits)
    if missing and raise_if_not_found:
        raise ValueError(f"no module name ends with {missing} in {type(model).__name__}")
    for m in found.values():
        set_z3_leaf_module(m, flag)
    return list(found.values()), missing


def apply_zero_leaf_module_config(model: nn.Module, leaf_cfg: Any) -> list[nn.Module]:
    """Flag the modules ``zero_optimization.leaf_module`` names (``ds_zero.LeafModuleConfig``:
    classes, names, name suffixes; None does nothing), as DeepSpeed's engine does before it
    wraps the model. Names or suffixes the user gave that match nothing are logged as a
    warning; the default classes (Hugging Face's MoE blocks) may match nothing silently."""
    if leaf_cfg is None:
        return []
    found: dict[int, nn.Module] = {}
    if leaf_cfg.classes:
        found.update((id(m), m) for m in _set(model, leaf_cfg.classes, True, False))
    for pick, wanted, what in (
        (set_z3_leaf_modules_by_name, leaf_cfg.names, "names"),
        (set_z3_leaf_modules_by_suffix, leaf_cfg.name_suffixes, "name_suffixes"),
    ):
        if not wanted:
            continue
        hits, missing = pick(model, wanted, True, False)
        found.update((id(m), m) for m in hits)
        if missing:
            logger.warning(
                "zero_optimization.leaf_module.%s: %s match no module of the model; check them "
                "against model.named_modules()", what, missing,
            )  # fmt: skip
    return list(found.values())


__all__ = [
    "apply_zero_leaf_module_config",
    "get_z3_leaf_modules",
    "set_z3_leaf_module",
    "set_z3_leaf_modules",
    "set_z3_leaf_modules_by_name",
    "set_z3_leaf_modules_by_suffix",
    "unset_z3_leaf_modules",
    "z3_leaf_module",
    "z3_leaf_parameter",
]
