"""``deepspeed.runtime.pipe.topology``: the process topologies (ds-pipe's) that a
``PipelineModule`` takes as ``topology=``."""

from ds_pipe import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

__all__ = ["PipeDataParallelTopology", "PipeModelDataParallelTopology", "ProcessTopology"]
