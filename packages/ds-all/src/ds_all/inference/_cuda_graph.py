"""``enable_cuda_graph``: the model's forward captured once as a CUDA graph and replayed.

As in DeepSpeed, the first call runs the forward a few times on a side stream (so lazily
created workspaces and library handles exist before capture), then captures it; later calls
copy their tensors into the captured inputs and replay. The graph replays fixed shapes and
returns the same output tensors each time (overwritten by the next call): a call whose
tensors differ in shape or dtype from the captured ones is refused rather than broadcast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_WARMUP = 3


class CudaGraphRunner:
    """Captures ``module``'s forward on the first call, replays it on later ones."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._graph: torch.cuda.CUDAGraph | None = None
        #: the captured call's arguments (positional, then keywords in sorted order)
        self._inputs: list[Any] = []
        self._keys: list[str] = []
        self._output: Any = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = [*args, *(kwargs[k] for k in sorted(kwargs))]
        if self._graph is None:
            self._graph = self._capture(args, kwargs)
        else:
            self._copy_in(flat, sorted(kwargs))
        self._graph.replay()
        return self._output

    def _capture(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.cuda.CUDAGraph:
        # the graph reads from buffers it owns, so later inputs are copied into them and the
        # caller's first tensors are left alone
        own = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        own_kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self._inputs = [*own, *(own_kw[k] for k in sorted(own_kw))]
        self._keys = sorted(own_kw)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP):
                self.module(*own, **own_kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._output = self.module(*own, **own_kw)
        return graph

    def _copy_in(self, flat: list[Any], keys: list[str]) -> None:
        if keys != self._keys or len(flat) != len(self._inputs):
            raise ValueError(
                "enable_cuda_graph: the graph was captured for other arguments (positional "
                f"count {len(self._inputs) - len(self._keys)}, keywords {self._keys}); call the "
                "engine with the same arguments, or set enable_cuda_graph to false"
            )
        for i, (new, static) in enumerate(zip(flat, self._inputs)):
            if not isinstance(static, torch.Tensor):
                if new is not static and new != static:
                    raise ValueError(
                        f"enable_cuda_graph: argument {i} was {static!r} at capture and is "
                        f"{new!r} now; a CUDA graph replays the captured call"
                    )
                continue
            if (
                not isinstance(new, torch.Tensor)
                or new.shape != static.shape
                or (new.dtype != static.dtype)
            ):
                got = (tuple(new.shape), new.dtype) if isinstance(new, torch.Tensor) else new
                raise ValueError(
                    f"enable_cuda_graph: argument {i} was captured as "
                    f"{(tuple(static.shape), static.dtype)} and is {got} now; a CUDA graph "
                    "replays fixed shapes (pad the inputs, or set enable_cuda_graph to false)"
                )
            static.copy_(new)
