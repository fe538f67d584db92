"""eeipu-ray: memoization-aware, cost-aware hyperparameter tuning of multi-stage
ML pipelines on Ray Tune.

``import eeipu_ray`` stays cheap: Ray, torch and BoTorch load only when used.
"""

from __future__ import annotations

from typing import Any

from eeipu_ray.errors import (
    CacheConfigError,
    CacheError,
    CacheIntegrityError,
    CacheStorageError,
    CodecError,
    ConfigError,
    EEIPUError,
    PipelineDefinitionError,
    PrefixKeyError,
    StageExecutionError,
)
from eeipu_ray.pipeline import Pipeline, PipelineRun, Stage, StageContext

__version__ = "0.1.0"

_LAZY = {
    "PrefixCache": "eeipu_ray.cache",
    "pipeline_trainable": "eeipu_ray.tune",
    "EEIPUSearcher": "eeipu_ray.tune",
    "SM2Scheduler": "eeipu_ray.tune",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eeipu_ray' has no attribute {name!r}")


__all__ = [
    "CacheConfigError",
    "CacheError",
    "CacheIntegrityError",
    "CacheStorageError",
    "CodecError",
    "ConfigError",
    "EEIPUError",
    "EEIPUSearcher",
    "Pipeline",
    "PipelineDefinitionError",
    "PipelineRun",
    "PrefixCache",
    "PrefixKeyError",
    "SM2Scheduler",
    "Stage",
    "StageContext",
    "StageExecutionError",
    "pipeline_trainable",
]
