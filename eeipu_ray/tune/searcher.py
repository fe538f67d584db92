"""`EEIPUSearcher`: the EEIPU engine as a Ray Tune ``Searcher``.

A thin adapter: the Ray-free :class:`~eeipu_ray.search.BOEngine` does the
Bayesian optimization; this class translates Tune's calls, asks the prefix
cache which prefixes can be loaded, pins the ones the engine means to reuse,
and checkpoints the engine's state atomically for ``Tuner.restore``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import logging
import math
import os
import pickle
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from eeipu_ray import result as R
from eeipu_ray.errors import ConfigError, EEIPUError
from eeipu_ray.tune._arguments import (
    MOVED,
    SearcherOptionsError,
    SearcherStateError,
    check_arguments,
    copy_points,
    dump_checkpoint,
    explicit_fields,
    merge_options,
    moved_arguments,
    options_of_older,
    with_former,
)

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline import Pipeline
    from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace
    from eeipu_ray.search.decisions import Decision, Proposal
    from eeipu_ray.search.paths import PathLayout

logger = logging.getLogger(__name__)

# 2: the checkpoint carries the search's settings (space, pipeline, metric, mode,
# options, cache), so a freshly built searcher restores it.
CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)


class EEIPUSearcher(Searcher):
    """Memoization-aware, cost-aware Bayesian optimization (EEIPU) for Ray Tune.

    With a :class:`~eeipu_ray.pipeline.Pipeline`, trials run
    ``pipeline.as_trainable(cache=...)`` and report per-stage costs; the
    searcher learns one cost GP per stage and prefers candidates that reuse a
    cached prefix when that buys more expected improvement per unit of cost
    (Essofi et al., arXiv 2411.03731). Without a pipeline it is a cost-aware BO
    searcher over a plain Tune search space: the cost of a trial is read from
    the result key ``EngineOptions.cost_key`` (``time_total_s`` by default).

    With ``options=EngineOptions(cost="energy")`` the costs are joules: the
    budget is in joules, the stage-cost GPs model each stage's measured compute energy
    (``compute_energy_joules/<s>``, the original energy of a cached stage),
    and a trial is charged the energy it spent (``energy_joules/<s>``; a trial
    a scheduler stopped early, ``total_energy_joules`` so far). Trials must run
    where a meter works (``pipeline.as_trainable(cost="energy")`` fails
    them up front otherwise); a result that carries costs but no measured
    energy is refused with :class:`~eeipu_ray.errors.EnergyMeterError`.

    Search spaces follow Ray Tune's conventions. A plain space may be nested
    to any depth (``{"model": {"lr": tune.loguniform(...)}, "bs": 32}``): it is
    searched as flat ``"model/lr"`` keys and suggestions come back nested, with
    constants in place. With a pipeline, a ``Tuner(param_space=...)`` is
    honoured: its entries replace the pipeline's declared domains (so the
    searcher and the trials agree on the space); its keys must be
    hyperparameters of the pipeline. A plain searcher that holds a space
    already declines a ``param_space`` with domains, and Tune raises, as with
    Ray's own searchers.

    Args:
        pipeline: The pipeline being tuned (its nested search space is used),
            or ``None`` for a plain search space. A mapping here is taken as
            the plain space (``EEIPUSearcher(space, metric, mode)``).
        metric: The metric to optimize (or set by ``TuneConfig(metric=...)``).
        mode: ``"max"`` or ``"min"`` (or set by ``TuneConfig(mode=...)``).
        budget: Total cost the search may spend, in the trials' cost unit
            (seconds, or joules with ``EngineOptions(cost="energy")``);
            ``Searcher.FINISHED`` is returned once it is spent.
            While trials run, a new one starts only if the running ones are
            not expected to spend the rest (``suggest`` returns ``None``, wait,
            until one finishes; ``EngineOptions(reserve_pending=False)`` turns
            that off). ``None``: no budget (no cost cooling).
        cache: The prefix cache the trials use; the searcher asks it which
            prefixes are still cached and pins the ones it plans to reuse.
        acquisition: ``"eeipu"`` (default), ``"ei"``, ``"eips"``, ``"carbo"``, ``"random"``.
            This and ``budget`` set the :class:`~eeipu_ray.search.EngineOptions`
            fields of the same name; not given (``None``), they leave the field
            as ``options`` sets it.
        space: A Tune search space, when there is no pipeline (or given to
            ``Tuner(param_space=...)``).
        points_to_evaluate: Configs to try first.
        max_concurrent: Most trials running at once (0: no limit of its own;
            Tune then starts trials as resources allow, one pending at a time
            unless ``TUNE_MAX_PENDING_TRIALS_PG`` says more). ``ConcurrencyLimiter``
            sets it too.
        options: Everything else: :class:`~eeipu_ray.search.EngineOptions`
            (``n_warmup``, ``seed``, ``cost`` (``"time"`` or ``"energy"``),
            ``cost_key``, ``lookahead``, ``batch_size``, restarts, samples,
            top-Q, ...). ``acquisition`` or ``budget`` given here and
            disagreeing with a field ``options`` sets is an error naming both.
            The former arguments ``n_warmup``, ``seed``, ``cost``, ``cost_key``,
            ``lookahead`` and ``batch_size`` are still accepted, with a
            ``FutureWarning``, and go into ``options``.

    Raises:
        SearcherOptionsError: an invalid argument, or one that conflicts with
            ``options``, named with its value.
        EngineOptionsError: an invalid option (naming it).
        SearcherStateError: both a pipeline and a space.
        SearchSpaceError: the space cannot be encoded (naming the key).
        ConfigError: a ``points_to_evaluate`` entry does not fit the pipeline.

    Example:
        >>> searcher = EEIPUSearcher(pipeline, metric="score", mode="max",
        ...                          budget=3600.0, cache=cache, max_concurrent=4,
        ...                          options=EngineOptions(n_warmup=8, seed=1))
        >>> tune.Tuner(pipeline.as_trainable(cache=cache, metric="score"),
        ...            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1)).fit()
        >>> searcher.save("searcher.pkl")
        >>> again = EEIPUSearcher()
        >>> again.restore("searcher.pkl")  # space, metric, mode, observations, budget
    """

    def __init__(
        self,
        pipeline: Pipeline | Mapping[str, Any] | None = None,
        metric: str | None = None,
        mode: str | None = None,
        budget: float | None = None,
        cache: PrefixCache | None = None,
        acquisition: str | None = None,
        *,
        space: Mapping[str, Any] | None = None,
        points_to_evaluate: Sequence[Mapping[str, Any]] | None = None,
        max_concurrent: int | None = None,
        options: EngineOptions | None = None,
        **moved: Any,
    ) -> None:
        from eeipu_ray.pipeline import Pipeline

        if isinstance(pipeline, Mapping):  # EEIPUSearcher(space, metric, mode), as OptunaSearch
            if space is not None:
                raise SearcherOptionsError(
                    "the search space was given twice (positionally and as space=); give it once"
                )
            pipeline, space = None, pipeline
        moved = moved_arguments(moved)
        check_arguments(
            pipeline=pipeline,
            space=space,
            metric=metric,
            mode=mode,
            options=options,
            max_concurrent=max_concurrent,
            is_pipeline=pipeline is None or isinstance(pipeline, Pipeline),
        )
        metric, mode, engine_options = merge_options(
            options, metric=metric, mode=mode, acquisition=acquisition, budget=budget, **moved
        )
        super().__init__(metric=metric, mode=mode)
        # What this instance was given explicitly: ``restore`` keeps it and takes
        # the rest from the checkpoint.
        given = {
            "pipeline": pipeline,
            "space": space,
            "cache": cache,
            "metric": metric,
            "mode": mode,
            "max_concurrent": max_concurrent,
        }
        self._given = {name for name, value in given.items() if value is not None}
        self._given_options = explicit_fields(
            options, acquisition=acquisition, budget=budget, **moved
        )
        self._pipeline: Pipeline | None = pipeline
        self._cache = cache
        self._options = engine_options
        self._max_concurrent = max_concurrent or 0
        self._points = copy_points(points_to_evaluate)
        # The space the searcher encodes: the pipeline's declared space (with the
        # entries of a Tuner's param_space in place), or the plain space as given.
        self._space: dict[str, Any] | None = None
        self._layout: PathLayout | None = None  # plain spaces: nested <-> flat keys
        if pipeline is not None:
            self._use_space(pipeline.search_space)
        elif space is not None:
            self._use_space(space)
        self._init_run_state()
        if self._ready():
            self._build_engine()

    def _init_run_state(self) -> None:
        """The state of a search in progress: none yet."""
        self._engine: BOEngine | None = None
        self._pinned: set[str] = set()
        self._pending_state: dict[str, Any] | None = None
        self._n_evaluated = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future[Any] | None = None
        self._queue: list[Proposal] = []  # finished lookahead proposals, oldest first
        self._timing = _Timing()
        self._last_results: dict[str, dict[str, Any]] = {}  # by running trial

    # ------------------------------------------------------------ set-up
    def _use_space(self, space: Mapping[str, Any]) -> None:
        """Make ``space`` the one the searcher encodes.

        Raises:
            SearchSpaceError: a key of a plain space is not a string, or two of
                its paths flatten to the same key.
            ConfigError: a ``points_to_evaluate`` entry outside a pipeline's space.
        """
        if self._pipeline is None:
            self._layout = _layout_of(space)
            self._space = dict(space)
            return
        from eeipu_ray.pipeline import Pipeline

        nested = {str(stage): dict(sub) for stage, sub in space.items()}
        effective = Pipeline(self._pipeline.name, self._pipeline.stages, space=nested)
        for i, point in enumerate(self._points):
            try:
                effective.check_config(point)
            except ConfigError as exc:
                raise ConfigError(f"points_to_evaluate[{i}]: {exc}") from exc
        self._space = nested

    def _pipeline_space_with(self, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The pipeline's declared space with a Tuner ``param_space``'s entries in place.

        Args:
            config: ``{stage: {key: domain or value}}``, or the flat
                ``{"stage/key": ...}`` form. Stages it leaves out keep their
                declared space.

        Raises:
            SearchSpaceError: naming the ``param_space`` key that belongs to no
                stage, or is no hyperparameter of its stage (the trainable would
                refuse it).
        """
        from eeipu_ray.search.errors import SearchSpaceError

        assert self._pipeline is not None
        space = self._pipeline.search_space
        name = self._pipeline.name
        for top, value in config.items():
            if isinstance(top, str) and top not in space and "/" in top:
                entries = [(top, *top.split("/", 1), value)]
            elif top in space and isinstance(value, Mapping):
                entries = [(f"{top}/{key}", top, key, v) for key, v in value.items()]
            elif top in space:
                raise SearchSpaceError(
                    f"param_space[{top!r}] must map stage {top!r}'s hyperparameters to domains "
                    f"or values, got {value!r:.100}"
                )
            else:
                raise SearchSpaceError(
                    f"param_space key {top!r} names no stage of pipeline {name!r} "
                    f"(stages: {list(space)})"
                )
            for shown, stage, key, domain in entries:
                if stage not in space or key not in space[stage]:
                    known = sorted(space[stage]) if stage in space else list(space)
                    raise SearchSpaceError(
                        f"param_space key {shown!r} is no hyperparameter of pipeline {name!r} "
                        f"(known: {known}); its trials would refuse it"
                    )
                space[stage][key] = domain
        return space

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        """Take ``metric``, ``mode`` and the ``param_space`` from Tune.

        With a pipeline the ``param_space`` is honoured: its entries replace the
        pipeline's declared domains (the trials run what the searcher proposes
        from it), and its keys must be hyperparameters of the pipeline. A plain
        searcher that already holds a space declines (returns ``False``) when
        ``param_space`` defines domains, as Ray's own searchers do: Tune then
        raises. A searcher that has begun (trials suggested or a checkpoint
        restored) accepts only the space it searches already.

        Raises:
            SearchSpaceError: a ``param_space`` key is not a hyperparameter of
                the pipeline, or the space cannot be encoded.
            SearcherStateError: ``metric``/``mode`` differ from those of a search
                that has begun.
        """
        started = self._started()
        for name, value in (("metric", metric), ("mode", mode)):
            held = getattr(self, f"_{name}")
            if value and started and held and value != held:
                raise SearcherStateError(
                    f"tune {name}={value!r} differs from the {name}={held!r} this searcher "
                    "has been searching with; give one"
                )
        if self._pipeline is not None:
            space = self._pipeline_space_with(config or {})
        elif self._space is not None:
            if _mentions_domain(config):
                return False  # Tune raises: the space was given to the searcher already
            space = self._space
        elif not _mentions_domain(config):
            return False  # nothing to search in param_space
        else:
            space = dict(config)
        if started:
            if self._space_signature(space) != self.engine.space.signature():
                logger.warning(
                    "EEIPUSearcher: the param_space differs from the space this search has "
                    "been searching; declined"
                )
                return False
        else:
            self._use_space(space)
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        if not started and self._ready():
            self._build_engine()
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = max_concurrent
        return True

    def _ready(self) -> bool:
        return self._space is not None and self._metric is not None and self._mode is not None

    def _started(self) -> bool:
        """Whether a search began: the engine holds trials (suggested or restored)."""
        return self._engine is not None and len(self._engine.store) > 0

    def _encoder(self, space: Mapping[str, Any]) -> SearchSpace:
        from eeipu_ray.search import SearchSpace

        if self._pipeline is not None:
            return SearchSpace.from_tune(space, stage_order=self._pipeline.stage_names)
        # A plain space is one stage, whatever its nesting: its keys are paths.
        return SearchSpace.from_tune(_layout_of(space).flat_space, stage_order=None)

    def _space_signature(self, space: Mapping[str, Any]) -> list[str]:
        return self._encoder(space).signature()

    def _build_engine(self) -> None:
        from eeipu_ray.search import BOEngine

        if self._metric is None or self._mode is None:
            raise SearcherStateError(
                "EEIPUSearcher needs metric and mode: pass them to the searcher or to "
                "tune.TuneConfig(metric=..., mode=...)"
            )
        assert self._space is not None
        options = replace(self._options, metric=self._metric, mode=self._mode)
        self._engine = BOEngine(self._encoder(self._space), options)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self._load(pending)

    @property
    def engine(self) -> BOEngine:
        if self._engine is None:
            raise SearcherStateError(
                "EEIPUSearcher has no search space yet: give it a pipeline or space, pass "
                "param_space to tune.Tuner, or restore a checkpoint"
            )
        return self._engine

    # ------------------------------------------------------- config shapes
    def _to_engine(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A config as the engine encodes it (plain spaces: flat path keys)."""
        if self._layout is None or self._layout.is_flat:
            return dict(config)
        return self._layout.flatten(config)

    def _from_engine(self, config: dict[str, Any]) -> dict[str, Any]:
        """An engine config in the shape of the user's space."""
        if self._layout is None or self._layout.is_flat:
            return config
        return self._layout.nest(config)

    # ------------------------------------------------------------ Tune API
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        engine = self.engine
        if self._max_concurrent and len(engine.store.pending) >= max(1, self._max_concurrent):
            return None
        if engine.budget_left > 0 and not engine.can_start():
            return None  # the running trials are expected to spend the rest: wait
        if self._points:
            config = self._points.pop(0)
            if engine.budget_left <= 0:
                return Searcher.FINISHED
            engine.register(trial_id, self._to_engine(config), prefix_keys_of=self._keys_of())
            return copy.deepcopy(config)
        config = engine.suggest(
            trial_id,
            available_prefixes=self._available(),
            prefix_keys_of=self._keys_of(),
            lookahead=self._take_lookahead(),
        )
        if config is not None:
            self._timing.started(trial_id)
            if self._lookahead_on():
                self._refill()
        if config is None:
            logger.info(
                "EEIPUSearcher: budget spent (%.4g of %s); no more trials",
                engine.budget_spent,
                self.budget,
            )
            return Searcher.FINISHED
        return self._from_engine(config)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep the trial's latest intermediate result: should it error, Tune sends
        no result, and this one says what it spent (pipeline trials report their
        running costs, and what they spent when a stage raises)."""
        if trial_id in self.engine.store:
            self._last_results[trial_id] = result

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        engine = self.engine
        if trial_id not in engine.store:
            logger.warning("EEIPUSearcher: result for unknown trial %s ignored", trial_id)
            return
        last = self._last_results.pop(trial_id, None)
        if result is None and error:
            result = last  # charged what it reported spending; its metric is ignored
        engine.on_result(trial_id, self._with_cost(result), error=error)
        self._timing.finished(trial_id)
        self._sync_pins()

    def add_evaluated_point(
        self,
        parameters: dict[str, Any],
        value: float,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
    ) -> None:
        trial_id = f"evaluated-{self._n_evaluated}-{uuid.uuid4().hex[:8]}"
        self._n_evaluated += 1
        self.engine.add_evaluated(
            trial_id,
            self._to_engine(parameters),
            {self._metric: value},
            error=bool(error or pruned),
        )

    def add_evaluated_points(
        self, points: Sequence[tuple[Mapping[str, Any], float | Mapping[str, Any]]]
    ) -> None:
        """Warm-start from trials run elsewhere: ``(config, value)`` pairs, or
        ``(config, result)`` with a full result dict (the metric plus
        ``stage_costs/<s>`` and ``compute_costs/<s>``, as a pipeline trial
        reports them), which also teaches the cost models. Costs given this
        way count towards the budget, as if the search had spent them."""
        for config, outcome in points:
            if isinstance(outcome, Mapping):
                trial_id = f"evaluated-{self._n_evaluated}-{uuid.uuid4().hex[:8]}"
                self._n_evaluated += 1
                self.engine.add_evaluated(
                    trial_id, self._to_engine(config), self._with_cost(dict(outcome))
                )
            else:
                self.add_evaluated_point(dict(config), float(outcome))

    # ------------------------------------------------------- checkpointing
    def save(self, checkpoint_path: str) -> None:
        """Write the state atomically (temporary file, then ``os.replace``).

        The checkpoint holds everything a freshly built ``EEIPUSearcher()``
        needs to go on after :meth:`restore`: the observations and pending
        trials, the budget spent, the space (and the pipeline), metric, mode,
        options and cache.
        """
        payload = dump_checkpoint(self._state(), self._pipeline)
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        tmp = os.path.join(directory, f".{os.path.basename(checkpoint_path)}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, checkpoint_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _state(self) -> dict[str, Any]:
        """The versioned checkpoint: what ``save`` writes and pickling ships."""
        self._settle()  # no fit may run while the GP states are read
        return {
            "format": CHECKPOINT_FORMAT,
            "engine": self.engine.state_dict(),
            "points_to_evaluate": self._points,
            "pinned": sorted(self._pinned),
            "n_evaluated": self._n_evaluated,
            "last_results": self._last_results,
            "search": {
                "kind": "pipeline" if self._pipeline is not None else "plain",
                "pipeline": self._pipeline,
                "pipeline_name": self._pipeline.name if self._pipeline is not None else None,
                "stage_names": self._pipeline.stage_names if self._pipeline is not None else None,
                "space": self._space,
                "metric": self._metric,
                "mode": self._mode,
                "options": self._options,
                "cache": self._cache,
                "max_concurrent": self._max_concurrent,
            },
        }

    def restore(self, checkpoint_path: str) -> None:
        """Restore a checkpoint written by :meth:`save`, also into a freshly built
        ``EEIPUSearcher()`` with no space: ``suggest`` and ``on_trial_complete``
        work at once, trials pending at save time included.

        What this instance was given explicitly stays (a larger ``budget`` to go
        on with, another ``cache`` location); everything else comes from the
        checkpoint. A pipeline or space given here must encode like the
        checkpoint's, and ``metric``/``mode`` must match it.

        Raises:
            SearcherStateError: not a checkpoint of this searcher, or one that does
                not fit what this instance was given.
        """
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        if not isinstance(state, dict) or state.get("format") not in _READABLE_FORMATS:
            raise SearcherStateError(
                f"{checkpoint_path!r} is not an EEIPUSearcher checkpoint of format "
                f"{' or '.join(map(str, _READABLE_FORMATS))}"
            )
        self._settle()
        self._queue.clear()
        search = state.get("search")
        if search is not None:
            self._adopt(search, checkpoint_path)
        if self._ready():
            self._pending_state = state
            self._build_engine()  # loads the state
        else:
            self._pending_state = state  # a format-1 checkpoint: loaded once the space is known

    def _adopt(self, search: Mapping[str, Any], where: str) -> None:
        """Take the checkpoint's settings where this instance was given none.

        Raises:
            SearcherStateError: ``metric``/``mode`` given here differ from the
                checkpoint's, or the checkpoint holds no pipeline it needs.
        """
        for name in ("metric", "mode"):
            held, saved = getattr(self, f"_{name}"), search.get(name)
            if name in self._given and saved is not None and held != saved:
                raise SearcherStateError(
                    f"{where!r} was written by a search with {name}={saved!r}; this searcher "
                    f"was given {name}={held!r}"
                )
            if name not in self._given and saved is not None:
                setattr(self, f"_{name}", saved)
        saved_space = search.get("space")
        if search.get("kind") == "pipeline":
            if self._pipeline is None and "space" not in self._given:
                if search.get("pipeline") is None:
                    raise SearcherStateError(
                        f"{where!r} holds no pipeline: {search.get('pipeline_error', '')}pass "
                        "the pipeline to EEIPUSearcher before restoring"
                    )
                self._pipeline = search["pipeline"]
            saved_id = (search.get("pipeline_name"), search.get("stage_names"))
            mine = (self._pipeline.name, self._pipeline.stage_names) if self._pipeline else None
            if mine is not None and saved_id != mine:
                raise SearcherStateError(
                    f"{where!r} was written for pipeline {saved_id[0]!r} (stages {saved_id[1]}); "
                    f"this searcher was given pipeline {mine[0]!r} (stages {mine[1]})"
                )
            if mine is not None and saved_space is not None:
                self._use_space(saved_space)  # the declared space with param_space's entries
        elif self._pipeline is None and "space" not in self._given and saved_space is not None:
            self._use_space(saved_space)
        saved_options = search.get("options")
        if saved_options is not None:
            mine = {name: getattr(self._options, name) for name in self._given_options}
            self._options = replace(saved_options, **mine)
        for name in ("cache", "max_concurrent"):
            if name not in self._given and name in search:
                setattr(self, f"_{name}", search[name])
        # Checkpoints of older versions kept these beside the options.
        self._options = with_former(self._options, search, keep=self._given_options)

    def _load(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self._points = list(state.get("points_to_evaluate", []))
        self._pinned = set(state.get("pinned", []))
        self._n_evaluated = int(state.get("n_evaluated", 0))
        self._last_results = dict(state.get("last_results", {}))
        self._sync_pins()

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles the searcher: ship the engine as its plain state, not
        # as fitted GPs.
        state = self.__dict__.copy()
        state["_executor"] = state["_future"] = None
        state["_queue"] = []
        state["_timing"] = _Timing()
        if self._engine is not None:
            engine_state = self._state()
            engine_state.pop("search")  # the searcher's own attributes travel with it
            state["_pending_state"] = engine_state
            state["_engine"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Pickled by an older version:
        self.__dict__.setdefault("_last_results", {})
        self.__dict__.setdefault("_layout", None)
        self.__dict__.setdefault("_given", set())
        self.__dict__.setdefault("_given_options", set())
        if "_options" not in self.__dict__:
            self._options = options_of_older(state)
        former = {name: self.__dict__.pop(f"_{name}", None) for name in MOVED}
        self._options = with_former(self._options, former)
        if self._pending_state is not None and self._ready():
            self._build_engine()

    # ------------------------------------------------------------- progress
    @property
    def options(self) -> EngineOptions:
        """The engine options in effect (the arguments and ``options`` merged)."""
        return self._options

    @property
    def budget(self) -> float | None:
        """The cost budget of the search (``None``: unlimited)."""
        return self._options.budget

    @property
    def budget_spent(self) -> float:
        """Cost charged by finished trials (failures included), as the budget counts it."""
        return self.engine.budget_spent

    @property
    def eta(self) -> float:
        """The cost-cooling exponent the next BO step uses (see ``BOEngine.eta``)."""
        return self.engine.eta

    @property
    def decisions(self) -> list[Decision]:
        """The engine's decision log, one entry per suggestion (see ``BOEngine.decisions``);
        it is part of the checkpoint, so it survives ``Tuner.restore``."""
        return self.engine.decisions

    # ------------------------------------------------------------- helpers

    def _lookahead_on(self) -> bool:
        if self._options.lookahead is not None:
            return self._options.lookahead
        if self._max_concurrent == 1:
            return False
        # No limit given: trials run side by side when more than one is in flight.
        return self._max_concurrent > 1 or len(self.engine.store.pending) > 1

    def _settle(self) -> None:
        """Wait for the lookahead in flight, if any, and queue its proposals."""
        future, self._future = self._future, None
        if future is None:
            return
        try:
            self._queue.extend(future.result())
        except Exception:  # the synchronous path computes (and raises) again
            logger.warning("EEIPUSearcher: lookahead proposal failed", exc_info=True)

    def _take_lookahead(self) -> Proposal | None:
        """The oldest queued proposal that is still usable; waits for the batch in
        flight only when none is. ``None``: compute synchronously."""
        for wait in (False, True):
            if wait:
                self._settle()  # also: no lookahead may run beside a synchronous step
            while self._queue:
                proposal = self._queue.pop(0)
                if self.engine.usable(proposal):
                    return proposal
        return None

    def _refill(self) -> None:
        """Start the next lookahead batch unless one runs or the queue is full enough."""
        if self._future is not None:
            return
        target = self._target_batch()
        if len(self._queue) >= target:
            return
        compute = self.engine.lookahead_batch(
            self._available(), target - len(self._queue), reserved=list(self._queue)
        )
        if compute is None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="eeipu-lookahead"
            )
        self._future = self._executor.submit(self._timing.timed, compute)

    def _target_batch(self) -> int:
        """Proposals to keep ready: ``batch_size``, or its ``"auto"`` estimate."""
        if self._options.batch_size != "auto":
            return int(self._options.batch_size)
        running = len(self.engine.store.pending)
        cap = self._max_concurrent or max(running, 1)
        return max(1, min(cap, self._timing.demand(running)))

    def _keys_of(self) -> Any:
        return self._pipeline.prefix_keys if self._pipeline is not None else None

    def _available(self) -> Any:
        cache = self._cache
        if cache is None:
            return None

        def available(key: str) -> bool:
            try:
                return cache.contains(key)
            except (OSError, EEIPUError) as exc:
                logger.warning("EEIPUSearcher: cache lookup of %s failed: %s", key[:12], exc)
                return False

        return available

    @property
    def _cost_key(self) -> str:
        """The result key of a plain trainable's cost (``EngineOptions.cost_key``)."""
        if self._options.cost_key is not None:
            return self._options.cost_key
        return R.TOTAL_ENERGY_JOULES if self._options.cost == "energy" else "time_total_s"

    def _with_cost(self, result: dict[str, Any] | None) -> dict[str, Any] | None:
        if self._options.cost == "energy" and result is not None:
            result = self._energy_as_cost(result)
        if result is None or self._pipeline is not None:
            return result
        if R.STAGE_COST in result or self._cost_key not in result:
            return result
        cost = result[self._cost_key]
        return {**result, R.STAGE_COST: cost, R.COMPUTE_COST: cost}

    def _energy_as_cost(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with joules in the engine's cost fields (``EngineOptions.cost="energy"``).

        Time-based costs are dropped, never mixed in: a stage without measured
        energy has no cost here. A result that reports costs but no energy came
        from a node without a meter and is refused.

        Raises:
            EnergyMeterError: the result has costs but no measured energy.
        """
        from eeipu_ray.errors import EnergyMeterError

        if self._pipeline is None:
            if self._cost_key in result or R.STAGE_COST in result:
                return result
            if "time_total_s" in result or R.TOTAL_COST in result:
                raise EnergyMeterError(
                    f"EngineOptions(cost='energy'): the result has no {self._cost_key!r} "
                    "(joules); report measured energy under that key or set "
                    "EngineOptions(cost_key=...)"
                )
            return result
        if R.reports_time_costs(result) and not R.reports_energy(result):
            sources = sorted({str(v) for v in R.stage_entries(result, R.ENERGY_SOURCE).values()})
            raise EnergyMeterError(
                "EngineOptions(cost='energy'): a trial reported costs but no measured energy "
                f"(energy sources: {sources or ['none']}): no energy meter works where it ran. "
                "Run trials on nodes with NVIDIA GPUs (NVML, the 'energy' extra) or readable "
                "RAPL counters, or use EngineOptions(cost='time')"
            )
        return R.energy_as_cost(result)

    def _sync_pins(self) -> None:
        if self._cache is None or self._engine is None:
            return
        wanted = self._engine.pins()
        try:
            for key in wanted - self._pinned:
                self._cache.pin(key)
            for key in self._pinned - wanted:
                self._cache.unpin(key)
        except (OSError, EEIPUError) as exc:
            logger.warning("EEIPUSearcher: could not update cache pins: %s", exc)
            return
        self._pinned = wanted


class _Timing:
    """Wall-clock figures behind ``batch_size="auto"``: how long trials run, and
    how long one lookahead batch takes to compute."""

    def __init__(self, window: int = 32) -> None:
        self._start: dict[str, float] = {}
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        self.batch_seconds: float | None = None

    def started(self, trial_id: str) -> None:
        self._start[trial_id] = time.monotonic()

    def finished(self, trial_id: str) -> None:
        began = self._start.pop(trial_id, None)
        if began is not None:
            self._durations.append(time.monotonic() - began)

    def timed(self, compute: Any) -> Any:
        began = time.monotonic()
        out = compute()
        self.batch_seconds = time.monotonic() - began
        return out

    def demand(self, running: int) -> int:
        """Suggestions needed while one batch is computed, plus one: ``running``
        trials of median duration ``D`` free ``running / D`` slots a second
        (taken twice, as a margin)."""
        if self.batch_seconds is None or not self._durations or running < 1:
            return 1
        duration = max(statistics.median(self._durations), 1e-6)
        # Twice the expected need: a refit makes the occasional batch slower.
        return 1 + math.ceil(2.0 * running * self.batch_seconds / duration)


def _layout_of(space: Mapping[str, Any]) -> PathLayout:
    from eeipu_ray.search.paths import PathLayout  # the search package loads torch

    return PathLayout.of(space)


def _mentions_domain(value: Any) -> bool:
    from eeipu_ray.search.space import mentions_domain

    return mentions_domain(value)
