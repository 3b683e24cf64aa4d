"""DeepSpeed's model-state memory estimators, with its formulas and printed tables, for the
scripts that call them (``estimate_zero2_model_states_mem_needs_all_live(model, ...)``, ...).

These are DeepSpeed 0.19.8's own rules of thumb for DeepSpeed's memory, kept so that a script
prints the same table under ds-all: bytes per parameter, times ``additional_buffer_factor``
for the host side. This implementation's own model states are counted by ``memory_estimate``
(for example ZeRO 2 without offload: 2 + 16/N bytes per parameter on each device, where
DeepSpeed's rule says 2 + 18/N, as it keeps 16-bit gradients too).

ZeRO 1/2, per device and per host, N devices in all, Psi parameters:

- optimizer offloaded: device 2 Psi (16-bit parameters); host Psi x max(4 N, 16) x factor;
- not offloaded: device 2 Psi + 18 Psi / N; host 4 Psi x devices per node x factor.

ZeRO 3, with L the largest layer's parameters (device: 4 L for its gathered copy), 1 / nodes
of the states on each host:

- parameters and optimizer offloaded: device 4 L; host 18 Psi / nodes x factor, or without
  ``zero.Init`` max(4 x devices per node, 18 / nodes) x Psi x factor;
- optimizer offloaded: device 4 L + 2 Psi / N; host 16 instead of 18 above;
- nothing offloaded: device 4 L + 18 Psi / N; host 4 L x devices per node x factor with
  ``zero.Init``, else 4 Psi x devices per node x factor.
"""

from __future__ import annotations

from torch import nn

from ds_zero._param_meta import full_numel

__all__ = [
    "estimate_zero2_model_states_mem_needs",
    "estimate_zero2_model_states_mem_needs_all_cold",
    "estimate_zero2_model_states_mem_needs_all_live",
    "estimate_zero3_model_states_mem_needs",
    "estimate_zero3_model_states_mem_needs_all_cold",
    "estimate_zero3_model_states_mem_needs_all_live",
    "zero2_model_to_params",
    "zero3_model_to_params",
]

#: how DeepSpeed's tables name the host offload device (its enum's value, padded to 4)
_CPU = f"{'cpu':4}"


def _check(total_params: int, num_gpus_per_node: int, num_nodes: int) -> None:
    if total_params < 0:
        raise ValueError(f"total_params must be >= 0, got {total_params}")
    if num_gpus_per_node < 1 or num_nodes < 1:
        raise ValueError(
            f"num_gpus_per_node and num_nodes must be >= 1, got {num_gpus_per_node} and {num_nodes}"
        )


def _storage_key(p: nn.Parameter) -> int:
    # tensors sharing storage (tied weights kept as two parameters) count once; a released
    # ZeRO-3 parameter holds no storage, so it is keyed by itself
    return p.data_ptr() if p.numel() > 0 else id(p)


def zero2_model_to_params(model: nn.Module) -> int:
    """Parameters of ``model``, each tensor counted once however often it is shared, at full
    size (a partitioned ZeRO-3 parameter too)."""
    return sum({_storage_key(p): full_numel(p) for p in model.parameters()}.values())


def zero3_model_to_params(model: nn.Module) -> tuple[int, int]:
    """(total parameters, the largest module's own parameters): a module's direct parameters,
    as DeepSpeed counts a layer for ZeRO 3's gathered copy."""
    largest = max(
        (sum(full_numel(p) for p in m.parameters(recurse=False)) for m in model.modules()),
        default=0,
    )
    return zero2_model_to_params(model), largest


def estimate_zero2_model_states_mem_needs(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int]:
    """(host bytes, device bytes) by DeepSpeed's ZeRO 2 rule (module docstring)."""
    _check(total_params, num_gpus_per_node, num_nodes)
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def estimate_zero3_model_states_mem_needs(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int, int]:
    """(host bytes, device bytes, the largest layer's gathered bytes) by DeepSpeed's ZeRO 3
    rule (module docstring)."""
    _check(total_params, num_gpus_per_node, num_nodes)
    total_gpus = num_nodes * num_gpus_per_node
    per_node = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        # optimizer states and fp32 master on the host: 16 bytes a parameter, 18 with the
        # 16-bit parameters there too
        host = 18 if cpu_offload_params else 16
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
        if zero_init:
            cpu_mem = total_params * host * per_node * additional_buffer_factor
        else:
            cpu_mem = (
                total_params
                * max(4 * num_gpus_per_node, host * per_node)
                * additional_buffer_factor
            )
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def _header(num_nodes: int, num_gpus_per_node: int, software: str) -> None:
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    print(
        "Estimated memory needed for params, optim states and gradients for a:\n"
        f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
        f"SW: {software}"
    )
    print("  per CPU  |  per GPU |   Options")


def _row(cpu_mem: int, gpu_mem: int, options: str) -> None:
    print(f" {cpu_mem / 2**30:7.2f}GB | {gpu_mem / 2**30:6.2f}GB | {options}")


def estimate_zero2_model_states_mem_needs_all_cold(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> None:
    """Print DeepSpeed's ZeRO 2 table for ``total_params`` parameters: with and without the
    optimizer offloaded."""
    _check(total_params, num_gpus_per_node, num_nodes)
    _header(num_nodes, num_gpus_per_node, f"Model with {int(total_params / 1e6)}M total params.")
    for cpu_offload in (True, False):
        cpu_mem, gpu_mem = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node, num_nodes, cpu_offload, additional_buffer_factor
        )
        _row(cpu_mem, gpu_mem, f"offload_optimizer={_CPU if cpu_offload else 'none'}")


def estimate_zero2_model_states_mem_needs_all_live(
    model: nn.Module,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> None:
    """``estimate_zero2_model_states_mem_needs_all_cold`` for ``model``'s parameters."""
    estimate_zero2_model_states_mem_needs_all_cold(
        zero2_model_to_params(model), num_gpus_per_node, num_nodes, additional_buffer_factor
    )


def estimate_zero3_model_states_mem_needs_all_cold(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> None:
    """Print DeepSpeed's ZeRO 3 table: parameters and optimizer offloaded, the optimizer
    only, nothing; each with and without ``zero.Init``."""
    _check(total_params, num_gpus_per_node, num_nodes)
    _header(num_nodes, num_gpus_per_node,
            f"Model with {int(total_params / 1e6)}M total params, "
            f"{int(largest_layer_params / 1e6)}M largest layer params.")  # fmt: skip
    for cpu_offload, cpu_offload_params in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            cpu_mem, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
                total_params, largest_layer_params, num_gpus_per_node, num_nodes, cpu_offload,
                cpu_offload_params, zero_init, additional_buffer_factor,
            )  # fmt: skip
            options = (
                f"offload_param={_CPU if cpu_offload_params else 'none'}, "
                f"offload_optimizer={_CPU if cpu_offload else 'none'}, "
                f"zero_init={1 if zero_init else 0}"
            )
            _row(cpu_mem, gpu_mem, options)


def estimate_zero3_model_states_mem_needs_all_live(
    model: nn.Module,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> None:
    """``estimate_zero3_model_states_mem_needs_all_cold`` for ``model``."""
    total, largest = zero3_model_to_params(model)
    estimate_zero3_model_states_mem_needs_all_cold(
        total, largest, num_gpus_per_node, num_nodes, additional_buffer_factor
    )
