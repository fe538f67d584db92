"""The arguments of :class:`~eeipu_ray.tune.EEIPUSearcher`: checked, merged into
:class:`~eeipu_ray.search.EngineOptions`, and the checkpoint's bytes."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from eeipu_ray.errors import ConfigError, EEIPUError

if TYPE_CHECKING:
    from eeipu_ray.pipeline import Pipeline
    from eeipu_ray.search import EngineOptions

logger = logging.getLogger("eeipu_ray.tune.searcher")


class SearcherStateError(EEIPUError, RuntimeError):
    """The searcher was used before it knew its search space, or a checkpoint does not fit."""


class SearcherOptionsError(EEIPUError, ValueError):
    """An argument of :class:`EEIPUSearcher` is invalid; the message names it."""


def check_arguments(
    *,
    pipeline: Any,
    space: Any,
    metric: Any,
    mode: Any,
    options: Any,
    max_concurrent: Any,
    is_pipeline: bool,
) -> None:
    """Refuse invalid constructor arguments, naming them (Ray's Searcher would
    assert on some of them instead).

    Raises:
        SearcherOptionsError: naming the argument and its value.
        SearcherStateError: both a pipeline and a space.
    """
    from eeipu_ray.search import EngineOptions

    if not is_pipeline:
        raise SearcherOptionsError(
            f"pipeline={pipeline!r:.100} must be an eeipu_ray Pipeline, a search space mapping "
            f"or None, not {type(pipeline).__name__}"
        )
    if pipeline is not None and space is not None:
        raise SearcherStateError("give either a pipeline or a space, not both")
    if space is not None and not isinstance(space, Mapping):
        raise SearcherOptionsError(
            f"space must be a mapping of Tune domains, got {type(space).__name__}"
        )
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise SearcherOptionsError(f"metric={metric!r} must be a non-empty string or None")
    if mode not in (None, "min", "max"):
        raise SearcherOptionsError(f"mode={mode!r} must be 'min', 'max' or None")
    if options is not None and not isinstance(options, EngineOptions):
        raise SearcherOptionsError(
            f"options={options!r:.100} must be an EngineOptions, not {type(options).__name__}"
        )
    if max_concurrent is not None and (
        isinstance(max_concurrent, bool)
        or not isinstance(max_concurrent, int)
        or max_concurrent < 0
    ):
        raise SearcherOptionsError(f"max_concurrent={max_concurrent!r} must be an int >= 0")


MOVED = ("n_warmup", "seed", "cost", "cost_key", "lookahead", "batch_size")
"""Former constructor arguments, now :class:`~eeipu_ray.search.EngineOptions` fields."""


def moved_arguments(moved: Mapping[str, Any]) -> dict[str, Any]:
    """The given former arguments (see :data:`MOVED`), with a ``FutureWarning`` each.

    Raises:
        TypeError: an argument the searcher does not take (as Python would).
    """
    unknown = sorted(set(moved) - set(MOVED))
    if unknown:
        raise TypeError(f"EEIPUSearcher() got an unexpected keyword argument {unknown[0]!r}")
    given = {name: value for name, value in moved.items() if value is not None}
    for name, value in given.items():
        warnings.warn(
            f"EEIPUSearcher({name}={value!r}) is deprecated and will be removed: pass "
            f"options=EngineOptions({name}={value!r})",
            FutureWarning,
            stacklevel=3,
        )
    return given


def with_former(
    options: EngineOptions, saved: Mapping[str, Any], keep: Collection[str] = ()
) -> EngineOptions:
    """``options`` with the former arguments (:data:`MOVED`) that ``saved`` holds
    (a checkpoint's settings, or an older pickle's attributes), except ``None``
    and the fields in ``keep`` (given to this instance)."""
    former = {
        name: saved[name] for name in MOVED if saved.get(name) is not None and name not in keep
    }
    return replace(options, **former) if former else options


def copy_points(points: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Deep copies of ``points_to_evaluate``.

    Raises:
        ConfigError: an entry is not a mapping, naming its index.
    """
    for i, point in enumerate(points or []):
        if not isinstance(point, Mapping):
            raise ConfigError(
                f"points_to_evaluate[{i}] must be a config mapping, got "
                f"{type(point).__name__}: {point!r:.200}"
            )
    return [copy.deepcopy(dict(p)) for p in points or []]


def explicit_fields(options: EngineOptions | None, **arguments: Any) -> set[str]:
    """The EngineOptions fields set explicitly: by an argument that was given, or
    by ``options`` to a value other than the default."""
    from eeipu_ray.search import EngineOptions

    fields = {name for name, value in arguments.items() if value is not None}
    if options is not None:
        default = EngineOptions()
        fields |= {
            f.name
            for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(default, f.name)
        }
    return fields


def merge_options(
    options: EngineOptions | None, *, metric: str | None, mode: str | None, **arguments: Any
) -> tuple[str | None, str | None, EngineOptions]:
    """``(metric, mode, options)``: the searcher's arguments merged into ``options``.

    An argument that is not given (``None``) never overrides a field that
    ``options`` sets; an argument and an ``options`` field that both set a value,
    and disagree, are an error naming both. ``metric``/``mode`` come from
    ``options`` when the searcher is given none and ``options`` sets a metric.

    Raises:
        SearcherOptionsError: an argument conflicts with ``options``.
        EngineOptionsError: a merged value is invalid (naming it).
    """
    from eeipu_ray.search import EngineOptions

    base = options if options is not None else EngineOptions()
    default = EngineOptions()
    explicit = {"metric": metric, "mode": mode, **arguments}
    for name, value in explicit.items():
        held = getattr(base, name)
        set_by_options = options is not None and held != getattr(default, name)
        if value is not None and set_by_options and value != held:
            raise SearcherOptionsError(
                f"{name}={value!r} conflicts with options.{name}={held!r}; give it once"
            )
    if metric is None and options is not None and options.metric != default.metric:
        metric = options.metric
        mode = mode or options.mode
    given = {name: value for name, value in arguments.items() if value is not None}
    merged = replace(base, **given) if given else base
    return metric, mode, merged


def dump_checkpoint(state: dict[str, Any], pipeline: Pipeline | None) -> bytes:
    """The checkpoint's bytes (cloudpickle: a pipeline's stage functions may be
    closures). A pipeline that cannot be pickled is left out, with a warning: a
    restore then needs the pipeline given to the searcher."""
    from ray import cloudpickle

    try:
        return cloudpickle.dumps(state, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        if pipeline is None:
            raise
        reason = f"the pipeline could not be pickled ({type(exc).__name__}: {exc}); "
        logger.warning("EEIPUSearcher: checkpoint without its pipeline: %s", reason)
        search = {**state["search"], "pipeline": None, "pipeline_error": reason}
        return cloudpickle.dumps({**state, "search": search}, protocol=5)


def options_of_older(state: Mapping[str, Any]) -> EngineOptions:
    """EngineOptions from the attributes a searcher pickled by an older version had."""
    from eeipu_ray.search import EngineOptions

    base = state.get("_base_options") or EngineOptions()
    return replace(
        base,
        acquisition=state.get("_acquisition", base.acquisition),
        budget=state.get("_budget", base.budget),
        n_warmup=state.get("_n_warmup", base.n_warmup),
        seed=state.get("_seed", base.seed),
    )
