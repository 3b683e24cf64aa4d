"""PipelineModule, schedules as a checked IR, pipeline runtime, 3D topology."""

from ds_pipe._grid import PipelineGrid
from ds_pipe._layers import LayerSpec, TiedLayerSpec
from ds_pipe._meta import PayloadMeta, StageIOError, TensorMeta
from ds_pipe._module import PipelineModule
from ds_pipe._partition import PartitionError, balanced_boundaries, layer_weights, partition
from ds_pipe._runtime import PipelineRuntime, StepPhase
from ds_pipe._schedule_ir import Action, ActionKind, Schedule
from ds_pipe._schedules import (
    ScheduleConfigError,
    build_schedule,
    forward_only,
    gpipe,
    interleaved_1f1b,
    lower,
    one_f_one_b,
)
from ds_pipe._simulate import CostModel, DeadlockError, SimulationResult, simulate
from ds_pipe._topology import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessTopology,
)
from ds_pipe._validate import ScheduleError, validate
from ds_pipe._version import __version__

__all__ = [
    "Action",
    "ActionKind",
    "CostModel",
    "DeadlockError",
    "LayerSpec",
    "PartitionError",
    "PayloadMeta",
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineGrid",
    "PipelineModule",
    "PipelineRuntime",
    "ProcessTopology",
    "Schedule",
    "ScheduleConfigError",
    "ScheduleError",
    "SimulationResult",
    "StageIOError",
    "StepPhase",
    "TensorMeta",
    "TiedLayerSpec",
    "__version__",
    "balanced_boundaries",
    "build_schedule",
    "forward_only",
    "gpipe",
    "interleaved_1f1b",
    "layer_weights",
    "lower",
    "one_f_one_b",
    "partition",
    "simulate",
    "validate",
]
