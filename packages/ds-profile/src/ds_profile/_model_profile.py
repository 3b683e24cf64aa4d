"""get_model_profile: one profiled forward (or generate) of a model, DeepSpeed's signature."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ds_profile._format import macs_to_string, number_to_string, params_to_string
from ds_profile._profiler import FlopsProfiler


def _run(model: nn.Module, args: list[Any], kwargs: dict[str, Any], mode: str) -> None:
    fn = model.generate if mode == "generate" else model  # type: ignore[operator]
    fn(*args, **kwargs)


def get_model_profile(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    args: list[Any] = [],  # noqa: B006 - DeepSpeed's signature; never mutated here
    kwargs: dict[str, Any] = {},  # noqa: B006
    print_profile: bool = True,
    detailed: bool = True,
    module_depth: int = -1,
    top_modules: int = 1,
    warm_up: int = 1,
    as_string: bool = True,
    output_file: str | None = None,
    ignore_modules: list[type] | None = None,
    mode: str = "forward",
) -> tuple[Any, Any, Any]:
    """(flops, macs, params) of one forward of ``model`` after ``warm_up`` unprofiled ones.

    The model is switched to eval mode, as in DeepSpeed. ``input_shape`` builds one input
    tensor of the model's dtype and device (zeros, so integer-free models and embeddings alike
    get valid values); otherwise ``args``/``kwargs`` are passed to the model. ``mode`` is
    "forward" or "generate" (``model.generate``). Strings ("1.2 G", "3.4 GMACs", "5 M") when
    ``as_string``, else numbers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"get_model_profile: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    if mode not in ("forward", "generate"):
        raise ValueError(f"get_model_profile: mode must be 'forward' or 'generate', got {mode!r}")
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(
                f"get_model_profile: input_shape must be a non-empty tuple, got {input_shape!r}"
            )
        first = next(model.parameters(), None)
        like = {"dtype": first.dtype, "device": first.device} if first is not None else {}
        args = [torch.zeros(input_shape, **like)]
    if not args and not kwargs:
        raise ValueError("get_model_profile: give input_shape, or args and/or kwargs for the model")
    model.eval()
    for _ in range(warm_up):
        _run(model, args, kwargs, mode)
    prof = FlopsProfiler(model)
    prof.start_profile(ignore_list=ignore_modules)
    try:
        _run(model, args, kwargs, mode)
        prof.stop_profile()
        flops, macs, params = (int(prof.get_total_flops()), int(prof.get_total_macs()),
                               int(prof.get_total_params()))  # fmt: skip
        if print_profile:
            prof.print_model_profile(profile_step=warm_up, module_depth=module_depth,
                                     top_modules=top_modules, detailed=detailed,
                                     output_file=output_file)  # fmt: skip
    finally:
        prof.end_profile()
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)
    return flops, macs, params
