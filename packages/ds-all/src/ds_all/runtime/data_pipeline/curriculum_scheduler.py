"""``deepspeed.runtime.data_pipeline.curriculum_scheduler`` (ds-data's)."""

from ds_data import CurriculumScheduler

__all__ = ["CurriculumScheduler"]
