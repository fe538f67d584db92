"""Ready-made pipelines. Each module exposes ``build_pipeline(**options) -> Pipeline``."""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN = {
    "regression": "eeipu_ray.pipelines.regression",
    "synthetic": "eeipu_ray.pipelines.synthetic",
    "stacking": "eeipu_ray.pipelines.stacking",
    "cnn": "eeipu_ray.pipelines.cnn",
    "t5": "eeipu_ray.pipelines.t5",
}

EXTRAS = {"stacking": "examples", "cnn": "examples", "t5": "t5"}
"""The package extra each built-in pipeline needs beyond the core install."""


def load_pipeline(spec: str, **options: Any) -> Any:
    """A built-in pipeline by name, or a user's ``module:object``.

    ``object`` may be a :class:`~eeipu_ray.pipeline.Pipeline` or a callable
    returning one (called with ``options``).

    Raises:
        PipelineDefinitionError: the pipeline cannot be found, or ``options``
            name an argument its builder does not take (the message names it).
    """
    import inspect

    from eeipu_ray.errors import PipelineDefinitionError
    from eeipu_ray.pipeline import Pipeline

    def build(fn: Any) -> Any:
        try:
            inspect.signature(fn).bind(**options)
        except TypeError as exc:
            raise PipelineDefinitionError(
                f"pipeline {spec!r} does not take the options {sorted(options)}: {exc}"
            ) from exc
        except ValueError:  # no signature to check: let the call decide
            pass
        return fn(**options)

    if spec in BUILTIN:
        try:
            module = importlib.import_module(BUILTIN[spec])
        except ImportError as exc:
            extra = EXTRAS.get(spec)
            missing = exc.name or getattr(exc.__cause__, "name", None)
            missing = missing.split(".")[0] if missing else None
            hint = f": pip install 'eeipu-ray[{extra}]'" if extra else ""
            raise PipelineDefinitionError(
                f"pipeline {spec!r} needs {missing or 'a package'!r}, which is not installed{hint}"
            ) from exc
        return build(module.build_pipeline)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineDefinitionError(
            f"pipeline {spec!r} is neither built in ({sorted(BUILTIN)}) nor 'module:object'"
        )
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PipelineDefinitionError(f"cannot load pipeline {spec!r}: {exc}") from exc
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = build(obj)
    elif options:
        raise PipelineDefinitionError(
            f"{spec!r} is a ready Pipeline, not a builder: it takes no options ({sorted(options)})"
        )
    if not isinstance(obj, Pipeline):
        raise PipelineDefinitionError(f"{spec!r} is {type(obj).__name__}, not a Pipeline")
    return obj
