"""Ray Tune integration (the only package that imports Ray at module level)."""

from eeipu_ray.tune.searcher import EEIPUSearcher, SearcherStateError
from eeipu_ray.tune.trainable import pipeline_trainable

__all__ = ["EEIPUSearcher", "SearcherStateError", "pipeline_trainable"]
