"""The :class:`Pipeline`: an ordered list of stages with a nested search space."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from eeipu_ray._domains import is_grid_search, is_tunable
from eeipu_ray.errors import ConfigError, PipelineDefinitionError
from eeipu_ray.keys import chain_key, root_key
from eeipu_ray.pipeline.stage import Stage

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline.runner import PipelineRun

_PIPELINE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


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
                if is_tunable(domain):
                    raise ConfigError(
                        f"config lacks hyperparameter {stage.name}/{param} of pipeline "
                        f"{self.name!r}"
                    )
                params[param] = domain
        return per_stage

    def check_config(
        self, config: Mapping[str, Any], *, in_domain: bool = True
    ) -> list[dict[str, Any]]:
        """:meth:`split_config`, and every value checked against its domain.

        A value fits its domain when it is one of a ``choice``'s categories (or
        a ``grid_search``'s values); for ``uniform``/``loguniform``/``randint``
        and their quantized forms, when it is a real number (an integral one for
        integer domains; not a bool or a string), finite, and within the
        domain's ``[lower, upper]`` (up to float rounding). ``sample_from`` and
        constants take any value. With ``in_domain=False`` only the kind of
        value is checked (a finite number, an integer), not the bounds or the
        categories: what :func:`~eeipu_ray.pipeline.runner.run_pipeline`
        checks, since a Tune ``param_space`` may override a stage's declared
        space with values of its own. The searcher needs the domain itself
        (e.g. of its ``points_to_evaluate``).

        Returns:
            Each stage's hyperparameters, in stage order.

        Raises:
            ConfigError: naming ``stage/key``, the value and the domain, for the
                first value that does not fit (and everything ``split_config`` raises).
        """
        per_stage = self.split_config(config)
        for stage, params in zip(self.stages, per_stage, strict=True):
            for key, domain in stage.space.items():
                problem = _domain_problem(domain, params[key], in_domain=in_domain)
                if problem is not None:
                    raise ConfigError(
                        f"config value {stage.name}/{key} = {params[key]!r:.200} of pipeline "
                        f"{self.name!r} {problem}; give a value of the domain, or widen the "
                        "stage's space (Pipeline(space=...))"
                    )
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


def _domain_kind(value: Any) -> str | None:
    """``"grid"``, ``"choice"``, ``"float"``, ``"int"``, ``"other"`` (a domain this
    module does not check, e.g. ``sample_from``) or ``None`` for a constant."""
    if not is_tunable(value):
        return None
    if is_grid_search(value):
        return "grid"
    names = {cls.__name__ for cls in type(value).__mro__}
    for name, kind in (("Categorical", "choice"), ("Integer", "int"), ("Float", "float")):
        if name in names:
            return kind
    return "other"


def _domain_problem(domain: Any, value: Any, *, in_domain: bool = True) -> str | None:
    """Why ``value`` does not fit ``domain`` (words to follow the value), or None;
    ``in_domain=False``: only whether it is the kind of value the domain holds."""
    kind = _domain_kind(domain)
    if kind is None or kind == "other":
        return None
    if kind in ("choice", "grid"):
        if not in_domain:
            return None
        options = list(domain.categories if kind == "choice" else domain["grid_search"])
        if any(_same_option(option, value) for option in options):
            return None
        what = "choice" if kind == "choice" else "grid_search"
        return f"is not one of the {what} values {options!r:.200}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"is a {type(value).__name__}, not a number (domain {domain!r:.100})"
    if kind == "int" and not isinstance(value, numbers.Integral):
        return f"is a {type(value).__name__}, not an integer (domain {domain!r:.100})"
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        return "is not a finite number"
    if not in_domain:
        return None
    lower, upper = float(domain.lower), float(domain.upper)
    q = getattr(getattr(domain, "sampler", None), "q", None)
    # Float rounding only: Ray's own quantized samples are k * q, a bound times (1 + eps).
    tolerance = 1e-9 * max(1.0, abs(lower), abs(upper), abs(float(q or 0.0)))
    if not lower - tolerance <= number <= upper + tolerance:
        return f"is outside the domain's bounds [{lower!r}, {upper!r}]"
    return None


def _same_option(option: Any, value: Any) -> bool:
    # Identity first: categories may be classes, functions, objects with odd __eq__.
    if option is value:
        return True
    if isinstance(option, list | tuple) and isinstance(value, list | tuple):
        # Tune and JSON round trips may turn a tuple category into a list.
        return len(option) == len(value) and all(
            _same_option(a, b) for a, b in zip(option, value, strict=True)
        )
    try:
        return bool(option == value)
    except (TypeError, ValueError):  # e.g. NumPy arrays: ambiguous truth value
        return False


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
