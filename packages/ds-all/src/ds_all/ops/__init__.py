"""``deepspeed.ops``: optimizers and kernels under DeepSpeed's paths (ds_kernels').

``__compatible_ops__`` maps each op name of ``op_builder.all_ops.ALL_OPS`` to whether it can be
built (or run natively) here, as DeepSpeed's test suites and scripts read it; it is computed
on each access, from ds_kernels' registry."""

from typing import Any

from ds_all.ops import adagrad, adam, aio, lamb, lion, op_builder

__all__ = ["adagrad", "adam", "aio", "lamb", "lion", "op_builder"]


def __getattr__(name: str) -> Any:
    if name == "__compatible_ops__":
        from ds_all.ops.op_builder.all_ops import ALL_OPS

        return {op_name: builder.is_compatible() for op_name, builder in ALL_OPS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
