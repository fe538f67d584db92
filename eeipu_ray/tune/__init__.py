"""Ray Tune integration (the only package that imports Ray at module level)."""

from eeipu_ray.tune.trainable import pipeline_trainable

__all__ = ["pipeline_trainable"]
