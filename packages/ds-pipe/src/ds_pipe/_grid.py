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
        if _comm.is_initialized() and world != topology.world_size:
            raise ValueError(
                f"{topology} has {topology.world_size} ranks but the process group has {world}; "
                "make pipe x data x model equal the world size"
            )
        self.topology = topology
        self.global_rank: int = _comm.get_rank() if rank is None else rank
        coord = topology.get_coord(self.global_rank)
        self.stage_id: int = getattr(coord, "pipe", 0)
        self.data_parallel_id: int = getattr(coord, "data", 0)
        self.model_parallel_id: int = getattr(coord, "model", 0)
        self.pipe_parallel_size: int = topology.get_dim("pipe")
        self.data_parallel_size: int = topology.get_dim("data")
        self.model_parallel_size: int = topology.get_dim("model")
        self.pipe_ranks: list[int] = self._my_group_ranks("pipe")
        """Global ranks of this rank's pipeline, indexed by stage."""
        self.data_parallel_ranks: list[int] = self._my_group_ranks("data")
        self.pipe_group = _comm.new_group(self.pipe_ranks)
        self.data_parallel_group = _comm.new_group(self.data_parallel_ranks)
        self.model_parallel_ranks: list[int] = sorted(
            topology.filter_match(data=self.data_parallel_id)
            if "data" in topology.axes
            else range(topology.world_size)
        )
        """Ranks holding one full model replica (every stage and tensor slice of it)."""
        self.model_parallel_group = _comm.new_group(self.model_parallel_ranks)
        # Metadata of stage-to-stage tensors travels on its own CPU group so negotiating shapes
        # never queues behind (or in front of) activations on the data communicator.
        self.pipe_meta_group = _comm.new_group(self.pipe_ranks, backend="gloo")

    def _my_group_ranks(self, axis: str) -> list[int]:
        return next(g for g in self.topology.axis_groups(axis) if self.global_rank in g)

    def stage_to_global(self, stage_id: int) -> int:
        """Global rank of pipeline stage ``stage_id`` in this rank's replica."""
        return self.pipe_ranks[stage_id]

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.pipe_parallel_size - 1
