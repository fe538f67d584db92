"""The :class:`Pipeline`: an ordered list of stages with a nested search space."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from eeipu_ray.errors import ConfigError, PipelineDefinitionError
from eeipu_ray.pipeline.keys import chain_key, root_key
from eeipu_ray.pipeline.stage import Stage

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline.runner import PipelineRun

_PIPELINE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _is_domain(value: Any) -> bool:
    # Ray Tune domains, recognized without importing Ray (pipeline/ stays Ray-free).
    # ``tune.grid_search([...])`` is the plain dict ``{"grid_search": [...]}``: a
    # value to choose, never a constant to pass to the stage.
    if isinstance(value, Mapping) and set(value) == {"grid_search"}:
        return True
    return any(cls.__name__ == "Domain" for cls in type(value).__mro__)


class Pipeline:
    """A multi-stage ML pipeline whose stage outputs can be memoized.

    The search space is nested per stage: ``{"prep": {...}, "train": {...}}``.
    A trial's config has the same shape (Ray Tune passes it that way); the flat
    form ``{"prep/n": ..., "train/lr": ...}`` is accepted too.

    Args:
        name: Names the pipeline; part of every prefix key, so two pipelines
            never share cache entries by accident.
        stages: The stages in execution order.
        space: Optional ``{stage_name: {key: domain}}`` overriding or extending
            the stages' own spaces (reuse a pipeline with other ranges). A stage
            name here that the pipeline lacks is an error.

    Example:
        >>> from ray import tune
        >>> p = Pipeline("toy", [
        ...     Stage("prep", lambda _, hp: hp["n"], {"n": tune.randint(1, 10)}),
        ...     Stage("train", lambda n, hp: {"score": n * hp["lr"]}, {"lr": tune.uniform(0, 1)}),
        ... ])
        >>> sorted(p.search_space)
        ['prep', 'train']
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[Stage],
        space: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if not isinstance(name, str) or not _PIPELINE_NAME_RE.fullmatch(name):
            raise PipelineDefinitionError(
                f"pipeline name {name!r} is invalid: use letters, digits, '_', '.', '-'"
            )
        stages = list(stages)
        if not stages:
            raise PipelineDefinitionError(f"pipeline {name!r} has no stages; give at least one")
        seen: set[str] = set()
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise PipelineDefinitionError(
                    f"pipeline {name!r}: item {i} is {type(stage).__name__}, not a Stage"
                )
            if stage.name in seen:
                raise PipelineDefinitionError(
                    f"pipeline {name!r}: duplicate stage name {stage.name!r}; names must be unique"
                )
            seen.add(stage.name)
        if space is not None:
            stages = _apply_space(name, stages, space)
        self.name = name
        self.stages: tuple[Stage, ...] = tuple(stages)
        self._index = {s.name: i for i, s in enumerate(self.stages)}

    # ----------------------------------------------------------------- space
    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def search_space(self) -> dict[str, dict[str, Any]]:
        """The nested search space ``{stage: {key: domain or constant}}``."""
        return {s.name: dict(s.space) for s in self.stages}

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, stages={self.stage_names})"

    def split_config(self, config: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Return each stage's hyperparameters, in stage order.

        Constants of the space fill keys the config leaves out.

        Raises:
            ConfigError: naming the key when the config has a key that belongs to
                no stage, or lacks a hyperparameter that is a search domain.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
        per_stage: list[dict[str, Any]] = [{} for _ in self.stages]

        def put(stage_name: str, param: Any, value: Any, shown: str) -> None:
            self._check_param(stage_name, param, shown)
            params = per_stage[self._index[stage_name]]
            if param in params:  # nested and flat forms both set it
                raise ConfigError(
                    f"config sets hyperparameter {stage_name}/{param} twice (nested and flat "
                    f"form); give it once"
                )
            params[param] = value

        for key, value in config.items():
            if not isinstance(key, str):
                raise ConfigError(f"config key {key!r} is not a string")
            if "/" in key:  # flat form "stage/param"
                stage_name, _, param = key.partition("/")
                put(stage_name, param, value, key)
            elif key in self._index:
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"config[{key!r}] must be a mapping of stage {key!r}'s hyperparameters, "
                        f"got {value!r}"
                    )
                for param, v in value.items():
                    put(key, param, v, f"{key}/{param}")
            else:
                raise ConfigError(
                    f"config key {key!r} belongs to no stage of pipeline {self.name!r} "
                    f"(stages: {self.stage_names})"
                )
        for stage, params in zip(self.stages, per_stage, strict=True):
            for param, domain in stage.space.items():
                if param in params:
                    continue
                if _is_domain(domain):
                    raise ConfigError(
                        f"config lacks hyperparameter {stage.name}/{param} of pipeline "
                        f"{self.name!r}"
                    )
                params[param] = domain
        return per_stage

    def nest_config(self, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The config in nested form ``{stage: {key: value}}``, constants filled."""
        return {s.name: p for s, p in zip(self.stages, self.split_config(config), strict=True)}

    def _check_param(self, stage_name: str, param: str, shown: str) -> None:
        if stage_name not in self._index:
            raise ConfigError(
                f"config key {shown!r} names stage {stage_name!r}, which pipeline "
                f"{self.name!r} does not have (stages: {self.stage_names})"
            )
        if param not in self.stages[self._index[stage_name]].space:
            raise ConfigError(
                f"config key {shown!r}: stage {stage_name!r} has no hyperparameter {param!r} "
                f"(it has: {sorted(self.stages[self._index[stage_name]].space)})"
            )

    # ------------------------------------------------------------------ keys
    def prefix_keys(self, config: Mapping[str, Any]) -> list[str]:
        """Prefix keys of stages 1..k for k = 1..K (``keys[k-1]`` covers stages 1..k)."""
        return self._keys(self.split_config(config))

    def _keys(self, per_stage: Sequence[Mapping[str, Any]]) -> list[str]:
        keys: list[str] = []
        parent = root_key(self.name)
        for i, (stage, params) in enumerate(zip(self.stages, per_stage, strict=True), start=1):
            parent = chain_key(parent, i, stage.name, stage.version, params)
            keys.append(parent)
        return keys

    # ------------------------------------------------------------- execution
    def run(
        self,
        config: Mapping[str, Any],
        cache: PrefixCache | None = None,
        **kwargs: Any,
    ) -> PipelineRun:
        """Run the pipeline memoized; see :func:`eeipu_ray.pipeline.runner.run_pipeline`."""
        from eeipu_ray.pipeline.runner import run_pipeline

        return run_pipeline(self, config, cache, **kwargs)

    def as_trainable(self, cache: PrefixCache | None = None, metric: str = "score", **kwargs: Any):
        """A Ray Tune function trainable that runs this pipeline memoized.

        See :func:`eeipu_ray.tune.trainable.pipeline_trainable` for the result schema.
        """
        from eeipu_ray.tune.trainable import pipeline_trainable

        return pipeline_trainable(self, cache=cache, metric=metric, **kwargs)


def _apply_space(
    name: str, stages: list[Stage], space: Mapping[str, Mapping[str, Any]]
) -> list[Stage]:
    from dataclasses import replace

    if not isinstance(space, Mapping):
        raise PipelineDefinitionError(
            f"pipeline {name!r}: space must be a mapping {{stage: {{key: domain}}}}, got "
            f"{type(space).__name__}"
        )
    by_name = {s.name: s for s in stages}
    for stage_name, sub in space.items():
        if stage_name not in by_name:
            raise PipelineDefinitionError(
                f"pipeline {name!r}: space key {stage_name!r} belongs to no stage "
                f"(stages: {list(by_name)})"
            )
        if not isinstance(sub, Mapping):
            raise PipelineDefinitionError(
                f"pipeline {name!r}: space[{stage_name!r}] must be a mapping, got {sub!r}"
            )
    return [
        replace(s, space={**s.space, **space[s.name]}) if s.name in space else s for s in stages
    ]
