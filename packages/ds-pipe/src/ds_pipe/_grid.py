"""Process groups for a topology: the pipeline, data-parallel and model-parallel groups."""

from __future__ import annotations

from ds_pipe import _comm
from ds_pipe._topology import ProcessTopology


class PipelineGrid:
    """This rank's place in a topology and the process groups along each axis.

    Every rank of the world creates one; each creates only the groups it belongs to (with
    member-local synchronisation), in the same order as its peers.
    """

    def __init__(self, topology: ProcessTopology, rank: int | None = None) -> None:
        world = _comm.get_world_size()
        if _comm.is_initialized() and world != topology.world_size():
            raise ValueError(
                f"{topology} has {topology.world_size()} ranks but the process group has {world}; "
                "make pipe x data x model equal the world size"
            )
        self.topology = topology
        self.global_rank: int = _comm.get_rank() if rank is None else rank
        coord = topology.get_coord(self.global_rank)
        self.stage_id: int = getattr(coord, "pipe", 0)
        self.data_parallel_id: int = getattr(coord, "data", 0)
        self.model_parallel_id: int = getattr(coord, "model", 0)
        # get_dim is 0 for a missing axis (DeepSpeed's convention); a missing axis is size 1.
        self.pipe_parallel_size: int = max(topology.get_dim("pipe"), 1)
        self.data_parallel_size: int = max(topology.get_dim("data"), 1)
        self.model_parallel_size: int = max(topology.get_dim("model"), 1)
        self.pipe_ranks: list[int] = self._my_group_ranks("pipe")
        """Global ranks of this rank's pipeline, indexed by stage."""
        self.data_parallel_ranks: list[int] = self._my_group_ranks("data")
        self.pipe_group = _comm.new_group(self.pipe_ranks)
        self.data_parallel_group = _comm.new_group(self.data_parallel_ranks)
        self.model_parallel_ranks: list[int] = sorted(
            topology.filter_match(data=self.data_parallel_id)
            if "data" in topology.axes
            else range(topology.world_size())
        )
        """Ranks holding one full model replica (every stage and tensor slice of it)."""
        self.model_parallel_group = _comm.new_group(self.model_parallel_ranks)
        self.slice_parallel_ranks: list[int] = self._my_group_ranks("model")
        """Ranks holding the tensor slices of this rank's layers (the ``model`` axis)."""
        # Without a model axis the slice group is this rank alone: no group is created,
        # the accessors below report it as world size 1, rank 0.
        self.slice_parallel_group = (
            _comm.new_group(self.slice_parallel_ranks)
            if len(self.slice_parallel_ranks) > 1
            else None
        )
        # Metadata of stage-to-stage tensors travels on its own CPU group so negotiating shapes
        # never queues behind (or in front of) activations on the data communicator.
        self.pipe_meta_group = _comm.new_group(self.pipe_ranks, backend="gloo")

    def _my_group_ranks(self, axis: str) -> list[int]:
        return next(g for g in self.topology.axis_groups(axis) if self.global_rank in g)

    def stage_to_global(self, stage_id: int, **coords: int) -> int:
        """Global rank of pipeline stage ``stage_id`` in this rank's replica.

        Other coordinates may be overridden as in DeepSpeed, e.g. ``stage_to_global(0,
        data=1)`` is stage 0 of replica 1.
        """
        if not coords:
            return self.pipe_ranks[stage_id]
        me = self.topology.get_coord(self.global_rank)._asdict()
        unknown = sorted(set(coords) - set(me))
        if unknown:
            raise ValueError(
                f"stage_to_global: {self.topology} has no axis {unknown}; "
                f"its axes are {list(self.topology.axes)}"
            )
        return self.topology.get_rank(**{**me, **coords, "pipe": stage_id})

    # -- DeepSpeed's PipelineParallelGrid / mpu interface: code that takes an ``mpu`` (ZeRO,
    # activation checkpointing, Megatron-style layers) can be given this grid. "model
    # parallel" there means one whole replica (every stage and slice), "slice parallel" the
    # tensor-parallel ranks. (DeepSpeed's ``topology()`` method is the ``topology``
    # attribute here.)

    def get_global_rank(self) -> int:
        return self.global_rank

    def get_stage_id(self) -> int:
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        return self.data_parallel_id

    def get_pipe_parallel_rank(self) -> int:
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self):
        return self.pipe_group

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_group(self):
        return self.data_parallel_group

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel_ranks.index(self.global_rank)

    def get_model_parallel_world_size(self) -> int:
        return len(self.model_parallel_ranks)

    def get_model_parallel_group(self):
        return self.model_parallel_group

    def get_slice_parallel_rank(self) -> int:
        return self.model_parallel_id

    def get_slice_parallel_world_size(self) -> int:
        return self.model_parallel_size

    def get_slice_parallel_group(self):
        return self.slice_parallel_group

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.pipe_parallel_size - 1
