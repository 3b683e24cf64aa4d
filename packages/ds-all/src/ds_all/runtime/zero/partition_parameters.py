"""``deepspeed.runtime.zero.partition_parameters``: ``Init``, ``GatheredParameters`` and the
external-parameter registry with DeepSpeed's signatures, over ds_zero."""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_comm
import ds_zero
from ds_accel import get_accelerator
from ds_all._config_base import ConfigError

GatheredParameters = ds_zero.GatheredParameters

# The torch constructors zero.Init redirects while it is active, kept under DeepSpeed's names:
# Transformers' ZeRO-3 loader swaps ``zero_wrapper_for_fp_tensor_constructor`` for a version that
# leaves ``torch.arange``'s dtype alone and recognises arange by ``fn is _orig_torch_arange``, so
# Init looks both up in this module when it enters.
_orig_torch_tensor = torch.tensor
_orig_torch_empty = torch.empty
_orig_torch_zeros = torch.zeros
_orig_torch_ones = torch.ones
_orig_torch_full = torch.full
_orig_torch_arange = torch.arange
_orig_torch_eye = torch.eye
_orig_torch_randn = torch.randn
_CONSTRUCTORS = ("tensor", "empty", "zeros", "ones", "full", "arange", "eye", "randn")
_orig_module_apply = nn.Module.apply


@dataclass(frozen=True)
class _TorchPatchPoints:
    """What an Init patches in torch, as found at one moment: the constructors, the class's own
    ``Tensor.__new__`` (None: torch defines none) and ``nn.Module.apply``; ``restore`` puts
    exactly that back (also another Init's patches, when contexts nest)."""

    constructors: dict[str, Any]
    tensor_new: Any
    module_apply: Any

    @classmethod
    def current(cls) -> _TorchPatchPoints:
        return cls({name: getattr(torch, name) for name in _CONSTRUCTORS},
                   torch.Tensor.__dict__.get("__new__"), nn.Module.__dict__["apply"])  # fmt: skip

    @classmethod
    def original(cls) -> _TorchPatchPoints:
        return cls({name: globals()[f"_orig_torch_{name}"] for name in _CONSTRUCTORS}, None,
                   _orig_module_apply)  # fmt: skip

    def restore(self) -> None:
        for name, fn in self.constructors.items():
            setattr(torch, name, fn)
        if self.tensor_new is not None:
            torch.Tensor.__new__ = self.tensor_new  # type: ignore[method-assign]
        elif "__new__" in torch.Tensor.__dict__:
            del torch.Tensor.__new__
        nn.Module.apply = self.module_apply  # type: ignore[method-assign]


@contextlib.contextmanager
def init_context_suspended() -> Iterator[None]:
    """Torch's own tensor constructors and ``nn.Module.apply`` for the duration, whatever an
    active ``Init`` installed, then Init's again: DeepSpeed's initialize() does the same
    (shutdown/restore of the init context), so an engine built inside ``with zero.Init():``
    creates its fp32 master weights and buffers where and in the dtype its code says, not on the
    accelerator in the parameter dtype."""
    saved = _TorchPatchPoints.current()
    _TorchPatchPoints.original().restore()
    try:
        yield
    finally:
        saved.restore()


class DeepSpeedTensorOverride(enum.Enum):
    """What ``zero.Init(tensor_overrides=...)`` changes in the tensors created inside it."""

    dtype = 1  # floating-point tensors are cast to Init's dtype
    device = 2  # tensors without an explicit device are created on the local accelerator


DEFAULT_TENSOR_OVERRIDES = [DeepSpeedTensorOverride.dtype, DeepSpeedTensorOverride.device]


def zero_wrapper_for_fp_tensor_constructor(
    fn: Callable[..., torch.Tensor],
    target_fp_dtype: torch.dtype | None,
    target_device: torch.device | str | None = None,
) -> Callable[..., torch.Tensor]:
    """``fn`` creating its tensor on ``target_device`` when the call names no device, with a
    floating-point result cast to ``target_fp_dtype`` (an explicit dtype is cast too, as in
    DeepSpeed). None leaves that attribute alone."""

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is None and target_device is not None:
            kwargs["device"] = target_device
        t = fn(*args, **kwargs)
        if target_fp_dtype is not None and t.is_floating_point():
            t.data = t.data.to(target_fp_dtype)  # through .data: a requires_grad leaf stays a leaf
        return t

    return wrapped


def get_new_tensor_fn_for_dtype(
    target_fp_dtype: torch.dtype | None, target_device: torch.device | str | None
) -> Callable[..., torch.Tensor]:
    """``torch.Tensor.__new__`` (the legacy ``torch.Tensor(2, 3)``) under the same overrides.
    The legacy constructor makes CPU tensors only, so sizes go through ``new_empty`` of an empty
    tensor on the target device, and data (a list, a tensor) is copied there."""

    def new_tensor(cls: type, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes = args or (0,)
        if all(isinstance(a, int) for a in sizes) or (
            len(sizes) == 1 and isinstance(sizes[0], torch.Size)
        ):
            base = _orig_torch_empty(0, device=target_device)
            t = base.new_empty(*sizes, **kwargs)
        else:
            t = _orig_torch_tensor(*args, **kwargs)
            if target_device is not None:
                t = t.to(target_device)
        if target_fp_dtype is not None and t.is_floating_point():
            t = t.to(target_fp_dtype)
        return t

    return new_tensor


@dataclass(frozen=True)
class _Targets:
    """Placement of one Init: the local accelerator (None on a CPU accelerator: nothing moves),
    where and in which dtype the constructors create tensors (None: as the code says), and
    whether partitions are kept in host memory."""

    local: torch.device | None
    device: torch.device | None
    dtype: torch.dtype | None
    shards_on_host: bool  # remote_device / offload_param cpu or nvme: partitions live in RAM

    @property
    def redirects(self) -> bool:
        return self.device is not None or self.dtype is not None


def _local_device(accelerator: Any) -> torch.device:
    """The accelerator this rank computes on: LOCAL_RANK's (modulo the devices visible, as the
    engine picks it, for launchers that give each rank one device), else the current one."""
    local = os.environ.get("LOCAL_RANK")
    if local in (None, ""):
        index = accelerator.current_device()
    else:
        index = int(local) % max(1, accelerator.device_count())
    return torch.device(accelerator.device_name(index))


def _effective_remote(remote_device: str | None, config: Any) -> str:
    """DeepSpeed's rule: a config's ``offload_param`` decides over the argument."""
    if config is not None:
        from ds_all._config import DeepSpeedConfig

        offload = DeepSpeedConfig.load(config).zero_optimization.get("offload_param")
        if isinstance(offload, dict):
            remote_device = offload.get("device", "none")
    return "none" if remote_device in (None, "none") else str(remote_device)


def _resolve_targets(
    accelerator: Any,
    overrides: Iterable[DeepSpeedTensorOverride],
    dtype: torch.dtype | None,
    remote_device: str | None,
    config: Any,
) -> _Targets:
    """Init's placement. On a CPU accelerator nothing is redirected (tensors are made where the
    module code puts them, in its dtype, and cast to ``dtype`` as each module is partitioned);
    elsewhere, as DeepSpeed: on the local accelerator in ``dtype``, partitions kept on the host
    when ``remote_device`` (or the config's ``offload_param.device``) is cpu or nvme."""
    overrides = list(overrides)
    for o in overrides:
        if not isinstance(o, DeepSpeedTensorOverride):
            raise TypeError(
                f"zero.Init(tensor_overrides=...): {o!r} is not a DeepSpeedTensorOverride; "
                "pass a list of DeepSpeedTensorOverride.dtype / .device (or [] for none)"
            )
    remote = _effective_remote(remote_device, config)
    if accelerator.device_name() == "cpu":
        return _Targets(None, None, None, shards_on_host=False)
    local = _local_device(accelerator)
    device = local if DeepSpeedTensorOverride.device in overrides else None
    fp = dtype if DeepSpeedTensorOverride.dtype in overrides else None
    return _Targets(local, device, fp, shards_on_host=remote in ("cpu", "nvme"))


class _ConstructorRedirect:
    """Installs the constructor wrappers for one Init and puts back what was there before
    (also another Init's wrappers, when contexts nest)."""

    def __init__(self, targets: _Targets) -> None:
        self.targets = targets
        self._saved: _TorchPatchPoints | None = None

    def __enter__(self) -> None:
        wrapper = globals()["zero_wrapper_for_fp_tensor_constructor"]  # maybe Transformers'
        dev, fp = self.targets.device, self.targets.dtype
        self._saved = _TorchPatchPoints.current()
        torch.Tensor.__new__ = get_new_tensor_fn_for_dtype(fp, dev)  # type: ignore[method-assign]
        for name in _CONSTRUCTORS:
            orig = globals()[f"_orig_torch_{name}"]
            setattr(torch, name, wrapper(orig, target_fp_dtype=fp, target_device=dev))

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            self._saved.restore()
            self._saved = None


def _keep_in_fp32_pattern(module: nn.Module, dtype: torch.dtype | None) -> re.Pattern[str] | None:
    """Buffer names a Transformers model keeps in fp32 under a 16-bit dtype
    (``_keep_in_fp32_modules_strict``, plus ``_keep_in_fp32_modules`` under fp16), matched as
    Transformers matches them; DeepSpeed 0.19.8's zero.Init restores those buffers to fp32
    after casting (its ``data_types.keep_in_fp32_modules`` "auto")."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    patterns = set()
    for name, child in module.named_modules():
        names = set(getattr(child, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            names |= set(getattr(child, "_keep_in_fp32_modules", None) or [])
        for n in names:
            pat = n.replace("*", ".*")
            patterns.add(rf"^{re.escape(name)}\..*{pat}" if name else pat)
    return re.compile("|".join(sorted(patterns))) if patterns else None


@torch.no_grad()
def _keep_buffers_in_fp32(module: nn.Module, dtype: torch.dtype | None) -> None:
    pattern = _keep_in_fp32_pattern(module, dtype)
    if pattern is None:
        return
    for name, buf in module.named_buffers():
        if buf is not None and buf.is_floating_point() and pattern.search(name):
            buf.data = buf.data.float()


def _override_module_apply(config: Any) -> bool:
    """``zero_optimization.override_module_apply`` (DeepSpeed's default: true)."""
    if config is None:
        return True
    from ds_all._config import DeepSpeedConfig

    return bool(DeepSpeedConfig.load(config).zero_optimization.get("override_module_apply", True))


def _gathering(fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """``fn`` run on a module with its partitioned parameters gathered, its changes written
    back into the partitions from rank 0 (every rank applies the same function)."""
    if getattr(fn, "_ds_gathering", False):
        return fn

    @functools.wraps(fn)
    def on_module(module: nn.Module) -> Any:
        # partitioned and released now; a parameter an enclosing GatheredParameters holds
        # whole is written back by that context
        params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id") and p.numel() == 0]  # fmt: skip
        if not params:
            return fn(module)
        with ds_zero.GatheredParameters(params, modifier_rank=0):
            return fn(module)

    on_module._ds_gathering = True  # type: ignore[attr-defined]
    return on_module


class _GatheringApply:
    """``nn.Module.apply`` gathering each module's partitioned parameters around the function
    while an Init is active, as DeepSpeed's ``override_module_apply``: a parent's
    ``self.apply(init_weights)`` in its ``__init__`` then initialises its children's weights,
    which were partitioned as each child finished, instead of writing into empty tensors."""

    def __init__(self) -> None:
        self._saved: Any = None

    def __enter__(self) -> None:
        self._saved = nn.Module.__dict__["apply"]
        previous = self._saved

        @functools.wraps(previous)
        def apply(module: nn.Module, fn: Callable[[nn.Module], Any]) -> nn.Module:
            return previous(module, _gathering(fn))

        nn.Module.apply = apply  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        nn.Module.apply = self._saved  # type: ignore[method-assign]


class ZeroParamStatus(enum.Enum):
    """Whether a stage-3 parameter is whole on this rank (DeepSpeed's names)."""

    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def _config_dtype(config: Any) -> torch.dtype | None:
    from ds_all._config import DeepSpeedConfig

    cfg = DeepSpeedConfig.load(config)
    if cfg.bf16.enabled and cfg.fp16.enabled:
        raise ConfigError("bf16.enabled and fp16.enabled are both true; enable one of them")
    if cfg.bf16.enabled:
        return torch.bfloat16
    if cfg.fp16.enabled:
        return torch.float16
    return torch.float32


def _check_qwz_in_config(config: Any, weights: bool, nontrainable: bool) -> None:
    """ZeRO++ qwZ acts on the gathers of the engine that initialize() builds from the config
    (Init's own partitioning is exact), so Init's flags must agree with the config's keys."""
    from ds_all._config import DeepSpeedConfig

    zero = DeepSpeedConfig.load(config).zero_optimization if config is not None else {}
    for flag, key in ((weights, "zero_quantized_weights"),
                      (nontrainable, "zero_quantized_nontrainable_weights")):  # fmt: skip
        if flag and not zero.get(key):
            raise ValueError(
                f"zero.Init({key}=True): qwZ is applied by the engine initialize() builds; set "
                f'"zero_optimization": {{"{key}": true}} in the config (and pass it to Init as '
                "config_dict_or_path)"
            )


class Init(ds_zero.Init):
    """``with deepspeed.zero.Init(...):`` builds a model whose parameters are partitioned as
    each module finishes ``__init__`` (ds_zero's ``Init``), with DeepSpeed's arguments.

    The group is ``data_parallel_group``, else ``sequence_data_parallel_group``, else the data
    group of ``mpu``, else ``zero_param_parallel_group``'s data group, else the world. The
    parameter dtype is ``dtype``, else the config's (bf16/fp16/fp32), else the model's own
    (DeepSpeed falls back to fp16 there). Without a process group one is created first
    (``init_distributed``), as DeepSpeed's Init does. Each new parameter is broadcast from the
    group's first rank before it is partitioned, as DeepSpeed's are, so ranks that drew
    different numbers still hold one model.

    On an accelerator other than the CPU, while the context is active, torch's tensor
    constructors (``torch.tensor``, ``empty``, ``zeros``, ``ones``, ``full``, ``arange``,
    ``eye``, ``randn`` and the legacy ``torch.Tensor(...)``) create tensors on this rank's
    accelerator when the call names no device, and cast floating-point results to the
    parameter dtype, as DeepSpeed's ``tensor_overrides`` (default: both) do: a model is built
    on the device (fast, and drawn by the device's generator as under DeepSpeed) one module at
    a time. Partitions stay on the device, or go to host memory when ``remote_device`` is "cpu"
    or "nvme" (a config's ``offload_param.device`` decides over the argument, as in DeepSpeed);
    ``initialize()`` then places them as the config says, pinned or not (``pin_memory`` has
    nothing to do before that: Init's partitions are re-laid by ``initialize()``). Buffers a
    Transformers model names in ``_keep_in_fp32_modules_strict`` (and ``_keep_in_fp32_modules``
    under fp16) are put back to fp32. On a CPU accelerator no constructor is redirected: tensors
    are made where the module code puts them and parameters are cast as they are partitioned.
    ``mem_efficient_linear`` has nothing to change (linear layers are not patched).

    ``nn.Module.apply`` gathers each module's partitioned parameters around the function while
    the context is active (DeepSpeed's ``zero_optimization.override_module_apply``, default
    true), so ``self.apply(init_weights)`` in a parent's ``__init__`` initialises the children
    it reaches as it would without ZeRO-3."""

    def __init__(
        self,
        module: nn.Module | None = None,
        data_parallel_group: Any = None,
        mem_efficient_linear: bool = True,
        remote_device: str | None = None,
        pin_memory: bool = False,
        config_dict_or_path: Any = None,
        config: Any = None,
        enabled: bool = True,
        dtype: torch.dtype | None = None,
        mpu: Any = None,
        zero_param_parallel_group: Any = None,
        zero_quantized_weights: bool = False,
        zero_quantized_nontrainable_weights: bool = False,
        sequence_data_parallel_group: Any = None,
        param_swapper: Any = None,
        tensor_overrides: Iterable[DeepSpeedTensorOverride] = DEFAULT_TENSOR_OVERRIDES,
    ) -> None:
        del mem_efficient_linear, pin_memory, param_swapper, zero_param_parallel_group
        if module is not None:
            raise ValueError(
                "zero.Init(module=...): partitioning an already-built model is not supported; "
                "build it inside `with deepspeed.zero.Init():` or let initialize() partition it"
            )
        if zero_quantized_weights or zero_quantized_nontrainable_weights:
            _check_qwz_in_config(config_dict_or_path if config_dict_or_path is not None else config,
                                 zero_quantized_weights, zero_quantized_nontrainable_weights)  # fmt: skip
        if remote_device not in (None, "none", "cpu", "nvme", get_accelerator().device_name()):
            raise ValueError(f"zero.Init: remote_device {remote_device!r}: use None, 'cpu' or 'nvme'")  # fmt: skip
        if config_dict_or_path is None:
            config_dict_or_path = config
        if dtype is None and config_dict_or_path is not None:
            dtype = _config_dtype(config_dict_or_path)
        if enabled and ds_comm.launched_rank() is not None and not ds_comm.is_initialized():
            # DeepSpeed's Init initialises the process group itself when a launcher started
            # this process as one of several ranks (scripts rely on it before initialize())
            from ds_all._initialize import init_distributed

            init_distributed()
        if enabled and not (dist.is_available() and dist.is_initialized()):
            # as DeepSpeed's Init: the process group is created here when the script has not
            # (a world of one under plain python), since partitions need it
            from ds_all._initialize import init_distributed

            init_distributed()
        group = data_parallel_group or sequence_data_parallel_group
        if group is None and mpu is not None:
            group = mpu.get_data_parallel_group()
        super().__init__(dp_group=group, enabled=enabled, dtype=dtype)
        accelerator = get_accelerator()
        self.targets: _Targets = _resolve_targets(
            accelerator, tensor_overrides, dtype, remote_device, config_dict_or_path
        )
        if self.targets.local is not None:
            # as DeepSpeed's Init: the local device becomes the current one
            accelerator.set_device(self.targets.local.index or 0)
        self._redirect: _ConstructorRedirect | None = None
        self.override_module_apply: bool = _override_module_apply(config_dict_or_path)
        self._apply: _GatheringApply | None = None
        # nesting depth of __init__ calls per module, as ds_zero counts it: the module is
        # finished (and its parameters placed) when the outermost call returns
        self._built_depth: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()

    def __enter__(self) -> Init:
        super().__enter__()
        if self.enabled and self.override_module_apply:
            self._apply = _GatheringApply()
            self._apply.__enter__()
        if self.enabled and self.targets.redirects:
            self._redirect = _ConstructorRedirect(self.targets)
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._redirect is not None:
                self._redirect.__exit__(*exc)
                self._redirect = None
            if self._apply is not None:
                self._apply.__exit__(*exc)
                self._apply = None
        finally:
            super().__exit__(*exc)

    def _wrap(self, orig: Callable[..., None]) -> Callable[..., None]:
        """ds_zero's wrapper (partition when the outermost ``__init__`` returns) around one that
        first finishes the module as DeepSpeed's post-init does (``_finish``)."""

        @functools.wraps(orig)
        def finish_then_partition(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            depth = self._built_depth.get(module, 0)
            self._built_depth[module] = depth + 1
            try:
                orig(module, *args, **kwargs)
            finally:
                self._built_depth[module] = depth
            if depth == 0:
                self._finish(module)

        return super()._wrap(finish_then_partition)

    @torch.no_grad()
    def _finish(self, module: nn.Module) -> None:
        """Buffers the model keeps in fp32 back to fp32; the module's new parameters on the
        local accelerator, then broadcast from the group's first rank (every rank's partition
        is cut from the same full value even where the ranks drew different numbers), then, for
        host partitions, in host memory, so the device holds one module's parameters at a time.
        """
        _keep_buffers_in_fp32(module, self.targets.dtype)
        # partitioned already (shared with an earlier module), or data-less (built on the meta
        # device, materialised later by the caller): nothing to place
        fresh = [
            p for p in module.parameters(recurse=False) if not hasattr(p, "ds_id") and not p.is_meta
        ]
        local = self.targets.local
        for p in fresh:
            if local is not None and p.device != local:
                # DeepSpeed partitions on the local device whatever device the code chose
                p.data = p.data.to(local)
        self._broadcast_from_first_rank(fresh)
        if self.targets.shards_on_host:
            for p in fresh:
                if p.device.type != "cpu":
                    p.data = p.data.to("cpu")

    def _broadcast_from_first_rank(self, params: list[nn.Parameter]) -> None:
        if not params or dist.get_world_size(self.group) == 1:
            return
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for p in params:
            if not p.is_contiguous():
                p.data = p.data.contiguous()
            # as bytes: any dtype, and the broadcast writes into the parameter's own storage
            dist.broadcast(p.data.reshape(-1).view(torch.uint8), src, group=self.group)


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Tell stage 3 that ``module``'s forward reads ``parameter`` of another module, so it is
    gathered whenever ``module`` runs. Call before ``initialize()``."""
    if not isinstance(parameter, torch.Tensor):
        raise TypeError(f"register_external_parameter: expected a Parameter, got {type(parameter).__name__}")  # fmt: skip
    external = module.__dict__.setdefault("ds_external_parameters", [])
    if not any(p is parameter for p in external):
        external.append(parameter)


def unregister_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    external = module.__dict__.get("ds_external_parameters", [])
    if not any(p is parameter for p in external):
        raise ValueError("unregister_external_parameter: the parameter was not registered on the module")  # fmt: skip
    external[:] = [p for p in external if p is not parameter]


__all__ = [
    "DEFAULT_TENSOR_OVERRIDES",
    "DeepSpeedTensorOverride",
    "GatheredParameters",
    "Init",
    "ZeroParamStatus",
    "register_external_parameter",
    "unregister_external_parameter",
    "get_new_tensor_fn_for_dtype",
    "zero_wrapper_for_fp_tensor_constructor",
]
