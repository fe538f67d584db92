"""Stages, pipelines, prefix keys and the memoized runner (no Ray here)."""

from eeipu_ray.keys import canonicalize, chain_key, check_key, root_key
from eeipu_ray.pipeline.pipeline import Pipeline
from eeipu_ray.pipeline.runner import PipelineRun, StageRecord, run_pipeline
from eeipu_ray.pipeline.stage import Stage, StageContext

__all__ = [
    "Pipeline",
    "PipelineRun",
    "Stage",
    "StageContext",
    "StageRecord",
    "canonicalize",
    "chain_key",
    "check_key",
    "root_key",
    "run_pipeline",
]
