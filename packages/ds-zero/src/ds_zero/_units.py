"""Which modules are stage-3 units, and which parameters each unit owns and touches."""

from __future__ import annotations

from torch import nn

from ds_zero._options import UnitPolicy


def find_units(
    root: nn.Module, policy: UnitPolicy | tuple[type[nn.Module], ...] | None
) -> list[nn.Module]:
    """The root first, then every module the policy selects (default: the children of each
    ``nn.ModuleList``, i.e. transformer blocks), in registration order."""
    if policy is None:
        chosen = [c for m in root.modules() if isinstance(m, nn.ModuleList) for c in m.children()]
    elif isinstance(policy, tuple):
        chosen = [m for m in root.modules() if isinstance(m, policy)]
    else:
        chosen = [m for m in root.modules() if policy(m)]
    # DeepSpeed's leaf flag (``_z3_leaf``, set by set_z3_leaf_modules): a flagged module is
    # gathered whole, so nothing below it becomes a unit (MoE blocks run only some experts)
    inside_leaf = {
        id(sub)
        for m in root.modules()
        if getattr(m, "_z3_leaf", False)
        for sub in m.modules()
        if sub is not m
    }
    chosen = [m for m in chosen if id(m) not in inside_leaf]
    units: list[nn.Module] = [root]
    seen = {id(root)}
    for m in chosen:
        if id(m) not in seen and any(True for _ in m.parameters()):
            seen.add(id(m))
            units.append(m)
    return units


def mark_leaf_parameters(root: nn.Module) -> None:
    """Point each parameter of a leaf module (``_z3_leaf``) at the outermost such module, as
    DeepSpeed's ``ds_z3_leaf_module`` attribute (``z3_leaf_parameter`` reads it)."""
    for m in root.modules():  # pre-order: an enclosing leaf comes before a nested one
        if getattr(m, "_z3_leaf", False):
            for p in m.parameters():
                if getattr(p, "ds_z3_leaf_module", None) is None:
                    p.ds_z3_leaf_module = m


def unit_params(root: nn.Module, units: list[nn.Module]) -> dict[int, list[nn.Parameter]]:
    """For each unit (by id), the parameters its own code reads: those reached from the unit
    without entering a nested unit. A tied parameter can appear under several units."""
    unit_ids = {id(u) for u in units}
    out: dict[int, list[nn.Parameter]] = {id(u): [] for u in units}

    def walk(module: nn.Module, unit: nn.Module, seen: set[int]) -> None:
        # parameters another module's code reads (DeepSpeed's register_external_parameter)
        external = getattr(module, "ds_external_parameters", ())
        for p in (*module.parameters(recurse=False), *external):
            if id(p) not in seen:
                seen.add(id(p))
                out[id(unit)].append(p)
        for child in module.children():
            if id(child) in unit_ids:
                if id(child) not in walked:
                    walked.add(id(child))
                    walk(child, child, set())
            else:
                walk(child, unit, seen)

    walked: set[int] = {id(root)}
    walk(root, root, set())
    return out
