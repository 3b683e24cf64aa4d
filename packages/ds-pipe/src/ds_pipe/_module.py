"""PipelineModule: a sequence of layers of which each rank builds only its own stages."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ds_comm
from ds_pipe import _comm
from ds_pipe._layers import LayerSpec, TiedLayerSpec
from ds_pipe._partition import partition
from ds_pipe._topology import PipeDataParallelTopology, ProcessTopology


def _seeded(seed: int):
    """Fork the RNG (CPU and the current CUDA device) so seeding a layer leaves no trace."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    rng = torch.random.fork_rng(devices=devices)
    rng.__enter__()
    torch.manual_seed(seed)
    return rng


class PipelineModule(nn.Module):
    """A model given as a list of layers, cut into pipeline stages.

    Parameters are named ``layers.<global layer index>.<name>`` and tied modules
    ``tied.<key>.<name>``, whatever the number of stages, so checkpoints reshard across stage
    counts by name. With ``num_chunks > 1`` (interleaved schedules) the layers are cut into
    ``num_stages * num_chunks`` virtual stages and virtual stage ``s`` lives on rank
    ``s % num_stages``.

    Args:
        layers: ``LayerSpec`` / ``TiedLayerSpec`` (built only where owned), ``nn.Module``
            (built by the caller, dropped where not owned) or parameter-free callables.
        num_stages: pipeline depth; taken from ``topology`` when omitted.
        topology: a ``ProcessTopology`` with a ``pipe`` axis; default pipe x data over the world.
        loss_fn: ``loss_fn(outputs, labels)`` applied on the last stage.
        partition_method: ``"parameters"``, ``"uniform"``, ``"type:REGEX"`` or explicit
            boundaries (``num_stages * num_chunks + 1`` layer indices).
        activation_checkpoint_interval: recompute every group of this many layers in backward
            (0: keep activations).
        seed_layers: build layer ``i`` under seed ``base_seed + i`` so its initial weights do
            not depend on which other layers this rank builds.
        stage_id: this rank's pipeline stage; by default from ``topology`` and the global rank.
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec | nn.Module | Callable[..., Any]],
        num_stages: int | None = None,
        topology: ProcessTopology | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        partition_method: str | Sequence[int] = "parameters",
        activation_checkpoint_interval: int = 0,
        seed_layers: bool = False,
        base_seed: int = 1234,
        num_chunks: int = 1,
        stage_id: int | None = None,
    ) -> None:
        super().__init__()
        # Without a process group every rank would build and train the whole model alone.
        ds_comm.require_initialized_if_launched("ds_pipe.PipelineModule")
        layers = list(layers)
        if not layers:
            raise ValueError("PipelineModule needs at least one layer")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, (LayerSpec, nn.Module)) or callable(layer)):
                raise TypeError(
                    f"layers[{i}] is {type(layer).__name__}; give a LayerSpec, TiedLayerSpec, "
                    "nn.Module or a callable"
                )
        self.topology: ProcessTopology = self._resolve_topology(num_stages, topology)
        self.num_stages: int = self.topology.get_dim("pipe")
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        self.num_chunks: int = num_chunks
        self.stage_id: int = self._resolve_stage_id(stage_id)
        if activation_checkpoint_interval < 0:
            raise ValueError("activation_checkpoint_interval must be >= 0")
        self.activation_checkpoint_interval: int = activation_checkpoint_interval
        self.loss_fn = loss_fn
        self.num_layers: int = len(layers)
        num_virtual = self.num_stages * self.num_chunks
        self.parts: list[int] = partition(layers, num_virtual, partition_method)
        """Layer boundaries of every virtual stage: stage s holds ``parts[s]:parts[s+1]``."""
        self.tied_stages: dict[str, list[int]] = {}
        """For each tie key, the virtual stages holding an occurrence."""
        for i, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                self.tied_stages.setdefault(layer.key, [])
                s = self.stage_of_layer(i)
                if s not in self.tied_stages[layer.key]:
                    self.tied_stages[layer.key].append(s)
        self.tied_weight_attrs: dict[str, tuple[str, ...]] = {}
        self.layers = nn.ModuleDict()
        self.tied = nn.ModuleDict()
        self._chunk_fns: list[list[tuple[int, Callable[..., Any]]]] = []
        first_tied_index = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                first_tied_index.setdefault(layer.key, i)
        for chunk in range(self.num_chunks):
            stage = chunk * self.num_stages + self.stage_id
            fns = []
            for i in range(self.parts[stage], self.parts[stage + 1]):
                fns.append(
                    (i, self._build_layer(i, layers[i], seed_layers, base_seed, first_tied_index))
                )
            self._chunk_fns.append(fns)

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def _resolve_topology(
        num_stages: int | None, topology: ProcessTopology | None
    ) -> ProcessTopology:
        if topology is not None:
            if "pipe" not in topology.axes:
                raise ValueError(f"{topology} has no 'pipe' axis; PipelineModule needs one")
            if num_stages is not None and num_stages != topology.get_dim("pipe"):
                raise ValueError(
                    f"num_stages={num_stages} disagrees with {topology}; give one or make them equal"
                )
            return topology
        if num_stages is None:
            raise ValueError("PipelineModule needs num_stages or topology")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        world = _comm.get_world_size() if _comm.is_initialized() else num_stages
        if world % num_stages:
            raise ValueError(
                f"world size {world} is not a multiple of num_stages={num_stages}; the data-"
                "parallel degree must be world_size / num_stages"
            )
        return PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)

    def _resolve_stage_id(self, stage_id: int | None) -> int:
        if stage_id is not None:
            if not 0 <= stage_id < self.num_stages:
                raise ValueError(f"stage_id={stage_id} outside 0..{self.num_stages - 1}")
            return stage_id
        if _comm.is_initialized():
            return self.topology.get_coord(_comm.get_rank()).pipe
        if self.num_stages == 1:
            return 0
        raise ValueError(
            f"no process group is initialised, so the stage of this process is unknown; pass "
            f"stage_id=0..{self.num_stages - 1} or initialise torch.distributed first"
        )

    def _build_layer(
        self,
        index: int,
        layer: object,
        seed_layers: bool,
        base_seed: int,
        first_tied_index: dict[str, int],
    ) -> Callable[..., Any]:
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in self.tied:
                seed = base_seed + first_tied_index[layer.key]
                self.tied[layer.key] = self._build_spec(layer, seed_layers, seed)
                self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
            module = self.tied[layer.key]
            if layer.forward_fn is not None:
                return functools.partial(layer.forward_fn, module)
            return module
        if isinstance(layer, LayerSpec):
            module = self._build_spec(layer, seed_layers, base_seed + index)
            self.layers[str(index)] = module
            return module
        if isinstance(layer, nn.Module):
            self.layers[str(index)] = layer
            return layer
        return layer  # a parameter-free callable

    @staticmethod
    def _build_spec(spec: LayerSpec, seed_layers: bool, seed: int) -> nn.Module:
        if not seed_layers:
            return spec.build()
        rng = _seeded(seed)
        try:
            return spec.build()
        finally:
            rng.__exit__(None, None, None)

    # -- queries --------------------------------------------------------------------------

    def stage_of_layer(self, index: int) -> int:
        """Virtual stage holding global layer ``index``."""
        for s in range(len(self.parts) - 1):
            if self.parts[s] <= index < self.parts[s + 1]:
                return s
        raise IndexError(f"layer {index} is outside 0..{self.num_layers - 1}")

    def local_stages(self) -> list[int]:
        """Virtual stages built on this rank, in chunk order."""
        return [c * self.num_stages + self.stage_id for c in range(self.num_chunks)]

    def chunk_layer_indices(self, chunk: int) -> list[int]:
        return [i for i, _ in self._chunk_fns[chunk]]

    # -- compute ----------------------------------------------------------------------------

    def forward_chunk(self, chunk: int, x: Any) -> Any:
        """Run this rank's chunk ``chunk`` (its layers in order) on ``x``.

        Each layer gets the previous layer's output as its single argument (a tuple stays a
        tuple), DeepSpeed's convention, so layers ported from DeepSpeed work unchanged.
        """
        fns = [fn for _, fn in self._chunk_fns[chunk]]
        interval = self.activation_checkpoint_interval
        if interval <= 0 or not torch.is_grad_enabled():
            for fn in fns:
                x = fn(x)
            return x
        for start in range(0, len(fns), interval):
            group = fns[start : start + interval]
            x = checkpoint(_run_layers, group, x, use_reentrant=False)
        return x

    def forward(self, x: Any) -> Any:
        """Whole-model forward; only possible when this rank holds every stage."""
        if self.num_stages != 1:
            raise RuntimeError(
                f"this rank holds stage {self.stage_id} of {self.num_stages}; run the pipeline "
                "with PipelineRuntime.train_batch / eval_batch instead of calling the module"
            )
        for chunk in range(self.num_chunks):
            x = self.forward_chunk(chunk, x)
        return x


def _run_layers(fns: list[Callable[..., Any]], x: Any) -> Any:
    for fn in fns:
        x = fn(x)
    return x
