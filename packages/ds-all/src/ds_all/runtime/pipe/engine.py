"""``deepspeed.runtime.pipe.engine``: ``PipelineEngine``, the engine ``initialize()`` returns for
a ``PipelineModule`` (``train_batch(data_iter)``, ``eval_batch(data_iter)``).

It is ds_all's own pipeline engine over ds_pipe's runtime, so ``isinstance(engine,
PipelineEngine)`` holds for it; unlike DeepSpeed's it does not subclass ``DeepSpeedEngine``, and
DeepSpeed's instruction-level internals (``_INSTRUCTION_MAP``, ``_exec_*``) do not exist: the
schedule is ds_pipe's."""

from ds_all._pipe_engine import PipelineEngine

__all__ = ["PipelineEngine"]
