"""Building the optimizer named by the config's ``optimizer {type, params}`` section."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from ds_all._config_base import ConfigError
from ds_all._optimizer_params import check_values

# DeepSpeed's names (lower-cased) -> how to build them.
_DS_NAMES = ("adam", "adamw", "lamb", "lion", "adagrad", "onebitadam", "onebitlamb", "zerooneadam")


def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    out = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if (
            inspect.isclass(obj)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        ):
            out[name.lower()] = obj
    return out


def _from_module(module: str, name: str) -> type | None:
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError:
        return None
    return getattr(mod, name, None)


#: Parameters of DeepSpeed's own optimizer classes (FusedAdam, FusedLamb, FusedLion) that the
#: classes used here do not take. ``None``: any value, no effect (ds-zero sets gradients to None
#: itself); otherwise only that value is accepted (what the classes here always do), and another
#: value is an error with the fix, instead of being dropped silently.
_DS_ONLY_PARAMS: dict[str, dict[str, Any]] = {
    "adam": {"bias_correction": True, "set_grad_none": None},
    "lamb": {"max_grad_norm": 0.0, "eps_inside_sqrt": False, "amsgrad": False},
    "lion": {"set_grad_none": None},
}
_DS_ONLY_FIX = {
    "bias_correction": "torch's Adam/AdamW always apply bias correction; remove the key",
    "max_grad_norm": 'clip with the top-level "gradient_clipping" instead',
    "eps_inside_sqrt": "remove the key (eps is added outside the square root)",
    "amsgrad": "remove the key",
}


def _pop_ds_only(key: str, params: dict[str, Any], type_name: str) -> None:
    for name, only in _DS_ONLY_PARAMS.get(key, {}).items():
        if name not in params:
            continue
        value = params.pop(name)
        if only is not None and value != only:
            raise ConfigError(f"optimizer.params.{name}={value!r} is not supported for "
                              f"{type_name}; {_DS_ONLY_FIX[name]}")  # fmt: skip


def _check_params(cls: Any, params: dict[str, Any], type_name: str) -> None:
    sig = inspect.signature(cls.__init__)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n in sig.parameters if n not in ("self", "params")]
    for key in params:
        if key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"accepted: {', '.join(accepted)}"
            raise ConfigError(
                f"optimizer.params.{key}: not a parameter of {type_name} ({cls.__name__}); {hint}"
            )


def resolve_optimizer(type_name: str, params: dict[str, Any],
                      device_type: str = "cpu") -> tuple[type, dict[str, Any]]:  # fmt: skip
    """The class DeepSpeed's optimizer ``type`` names and the keyword arguments to build it
    with, every value checked (ConfigError naming ``optimizer.params.<key>``).

    Adam follows DeepSpeed: ``adam_w_mode`` (default true) selects decoupled weight decay,
    ``torch_adam`` asks for torch's implementation. Lamb and Lion come from ds-kernels, the
    1-bit optimizers from ds-comm; any other name is looked up in torch.optim.
    """
    params = dict(params)
    key = type_name.lower().replace("_", "")
    torch_opts = _torch_optimizers()
    cls: Any
    if key in ("adam", "adamw"):
        adam_w_mode = params.pop("adam_w_mode", True)
        if not isinstance(adam_w_mode, bool):
            raise ConfigError(
                f"optimizer.params.adam_w_mode: expected true or false, got {adam_w_mode!r}"
            )
        params.pop("torch_adam", None)
        params.pop("fused", None)
        _pop_ds_only("adam", params, type_name)
        cls = torch.optim.AdamW if (adam_w_mode or key == "adamw") else torch.optim.Adam
        if device_type == "cuda":
            params.setdefault("fused", True)
    elif key in ("lamb", "lion"):
        _pop_ds_only(key, params, type_name)
        cls = _from_module("ds_kernels", "FusedLamb" if key == "lamb" else "FusedLion")
        if cls is None:
            raise ConfigError(
                f"optimizer.type {type_name!r} needs ds-kernels (pip install ds-kernels)"
            )
    elif key in ("onebitadam", "onebitlamb", "zerooneadam"):
        name = {
            "onebitadam": "OneBitAdam",
            "onebitlamb": "OneBitLamb",
            "zerooneadam": "ZeroOneAdam",
        }[key]
        cls = _from_module("ds_comm", name)
        if cls is None:
            raise ConfigError(f"optimizer.type {type_name!r} needs ds-comm's {name}")
    elif key in torch_opts:
        cls = torch_opts[key]
    else:
        known = sorted({"Adam", "AdamW", "Lamb", "Lion", "Adagrad", "OneBitAdam", "OneBitLamb", "ZeroOneAdam"}
                       | {c.__name__ for c in torch_opts.values()})  # fmt: skip
        near = difflib.get_close_matches(type_name, known, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(known)}"
        raise ConfigError(f"optimizer.type {type_name!r} is not a known optimizer; {hint}")
    _check_params(cls, params, type_name)
    return cls, check_values(cls, params, type_name)


def build_optimizer(type_name: str, params: dict[str, Any], model_parameters: Iterable[Any],
                    device_type: str) -> torch.optim.Optimizer:  # fmt: skip
    """An optimizer over ``model_parameters`` from DeepSpeed's optimizer type and params."""
    cls, kwargs = resolve_optimizer(type_name, params, device_type)
    return cls(model_parameters, **kwargs)
