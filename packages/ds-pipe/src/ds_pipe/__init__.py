"""PipelineModule, schedules as a checked IR, pipeline runtime, 3D topology."""

from ds_pipe._version import __version__

__all__ = ["__version__"]
