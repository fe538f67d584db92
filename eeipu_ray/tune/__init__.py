"""Ray Tune integration (the only package that imports Ray at module level)."""

from eeipu_ray.tune.searcher import EEIPUSearcher, SearcherOptionsError, SearcherStateError
from eeipu_ray.tune.sm2 import SM2Options, SM2Scheduler, fits_device_memory, sm2_score
from eeipu_ray.tune.trainable import pipeline_trainable

__all__ = [
    "EEIPUSearcher",
    "SM2Options",
    "SM2Scheduler",
    "SearcherOptionsError",
    "SearcherStateError",
    "fits_device_memory",
    "pipeline_trainable",
    "sm2_score",
]
