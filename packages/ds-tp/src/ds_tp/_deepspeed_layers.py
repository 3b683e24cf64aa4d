"""DeepSpeed's AutoTP layer classes, constructed as DeepSpeed constructs them (from an existing
``nn.Linear`` and the model-parallel group): the same layers as :class:`RowParallelLinear`
and :class:`ColumnParallelLinear`, under DeepSpeed's names and signatures."""

from __future__ import annotations

from typing import Any

from torch import nn

from ds_tp._layers import ColumnParallelLinear, RowParallelLinear


class LinearAllreduce(RowParallelLinear):
    """DeepSpeed's ``LinearAllreduce(module, mp_group)``: row-parallel over ``mp_group``; the
    input is the previous column-parallel layer's slice."""

    def __init__(self, module: nn.Linear, mp_group: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self._init_from(module, mp_group, True, False, 1, kwargs.get("name") or "LinearAllreduce")
        self.mp_group = mp_group


class LinearLayer(ColumnParallelLinear):
    """DeepSpeed's ``LinearLayer(module, mp_group=None, skip_partition=False,
    gather_output=False)``: column-parallel over ``mp_group`` (``skip_partition``: keep the
    weight whole, as DeepSpeed does for a layer it leaves unsharded)."""

    def __init__(
        self,
        module: nn.Linear,
        mp_group: Any = None,
        skip_partition: bool = False,
        gather_output: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        group = None if skip_partition else mp_group
        self._init_from(
            module, group, gather_output, False, 1, None, kwargs.get("name") or "LinearLayer"
        )
        self.mp_group = mp_group
