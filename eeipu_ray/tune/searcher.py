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
import dataclasses
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

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline import Pipeline
    from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace
    from eeipu_ray.search.engine import Decision, Proposal
    from eeipu_ray.search.paths import PathLayout

logger = logging.getLogger(__name__)

# 2: the checkpoint carries the search's settings (space, pipeline, metric, mode,
# options, cache), so a freshly built searcher restores it.
CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)


class SearcherStateError(EEIPUError, RuntimeError):
    """The searcher was used before it knew its search space, or a checkpoint does not fit."""


class SearcherOptionsError(EEIPUError, ValueError):
    """An argument of :class:`EEIPUSearcher` is invalid; the message names it."""


class EEIPUSearcher(Searcher):
    """Memoization-aware, cost-aware Bayesian optimization (EEIPU) for Ray Tune.

    With a :class:`~eeipu_ray.pipeline.Pipeline`, trials run
    ``pipeline.as_trainable(cache=...)`` and report per-stage costs; the
    searcher learns one cost GP per stage and prefers candidates that reuse a
    cached prefix when that buys more expected improvement per unit of cost
    (Essofi et al., arXiv 2411.03731). Without a pipeline it is a cost-aware BO
    searcher over a plain Tune search space: the cost of a trial is read from
    ``cost_key`` (``time_total_s`` by default).

    With ``cost="energy"`` the costs are joules: the budget is in joules, the
    stage-cost GPs model each stage's measured compute energy
    (``compute_energy_joules/<s>``, the original energy of a cached stage),
    and a trial is charged the energy it spent (``energy_joules/<s>``; a trial
    a scheduler stopped early, ``total_energy_joules`` so far). Trials must run
    where a meter works (``pipeline.as_trainable(energy="required")`` fails
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
            (seconds); ``Searcher.FINISHED`` is returned once it is spent.
            While trials run, a new one starts only if the running ones are
            not expected to spend the rest (``suggest`` returns ``None``, wait,
            until one finishes; ``EngineOptions(reserve_pending=False)`` turns
            that off). ``None``: no budget (no cost cooling).
        cache: The prefix cache the trials use; the searcher asks it which
            prefixes are still cached and pins the ones it plans to reuse.
        acquisition: ``"eeipu"`` (default), ``"ei"``, ``"eips"``, ``"carbo"``, ``"random"``.
            This, ``budget``, ``n_warmup`` and ``seed`` set the
            :class:`~eeipu_ray.search.EngineOptions` fields of the same name;
            not given (``None``), they leave the field as ``options`` sets it.
        space: A Tune search space, when there is no pipeline (or given to
            ``Tuner(param_space=...)``).
        points_to_evaluate: Configs to try first.
        n_warmup: Initial design size (default 10).
        seed: Seeds the initial design and the optimizer (default 0).
        max_concurrent: Most trials running at once (0: no limit of its own;
            Tune then starts trials as resources allow, one pending at a time
            unless ``TUNE_MAX_PENDING_TRIALS_PG`` says more). ``ConcurrencyLimiter``
            sets it too.
        cost: ``"time"`` (default: seconds of stage time) or ``"energy"``
            (joules measured by the trials' energy meters; see above).
        cost_key: Result key holding a plain trainable's cost (default
            ``time_total_s``; ``total_energy_joules`` with ``cost="energy"``).
        lookahead: Compute the next BO proposal in a background thread as soon
            as a suggestion is handed out, so a freed trial slot is refilled at
            once instead of after a full acquisition optimization
            (asynchronous BO: the proposal sees the trials running at that
            moment as pending, not the result that frees the slot). ``None``
            (default): on when ``max_concurrent > 1``, or with no limit
            (``0``) whenever more than one trial is running; a sequential
            search (``max_concurrent=1``) stays exact.
        batch_size: Proposals one lookahead computes from one acquisition
            optimization (greedy batch: the later ones treat the earlier ones
            as pending, see ``BOEngine.lookahead_batch``). ``"auto"``
            (default): as many as trial slots are expected to free up while
            one batch is computed (running trials / their median duration x
            the last batch's compute time, plus one), so that ``suggest`` keeps
            up with many workers; with few workers or long trials that is 1,
            which is the plain lookahead. An int fixes it.
        options: Further :class:`~eeipu_ray.search.EngineOptions` (restarts,
            samples, top-Q, ...). An argument above that is given and
            disagrees with a field ``options`` sets is an error naming both.

    Raises:
        SearcherOptionsError: an invalid argument, or one that conflicts with
            ``options``, named with its value.
        SearcherStateError: both a pipeline and a space.
        SearchSpaceError: the space cannot be encoded (naming the key).
        ConfigError: a ``points_to_evaluate`` entry does not fit the pipeline.

    Example:
        >>> searcher = EEIPUSearcher(pipeline, metric="score", mode="max",
        ...                          budget=3600.0, cache=cache, max_concurrent=4)
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
        n_warmup: int | None = None,
        seed: int | None = None,
        max_concurrent: int | None = None,
        cost: str | None = None,
        cost_key: str | None = None,
        options: EngineOptions | None = None,
        lookahead: bool | None = None,
        batch_size: int | str | None = None,
    ) -> None:
        from eeipu_ray.pipeline import Pipeline

        if isinstance(pipeline, Mapping):  # EEIPUSearcher(space, metric, mode), as OptunaSearch
            if space is not None:
                raise SearcherOptionsError(
                    "the search space was given twice (positionally and as space=); give it once"
                )
            pipeline, space = None, pipeline
        _check_arguments(
            pipeline=pipeline,
            space=space,
            metric=metric,
            mode=mode,
            options=options,
            max_concurrent=max_concurrent,
            batch_size=batch_size,
            cost=cost,
            cost_key=cost_key,
            is_pipeline=pipeline is None or isinstance(pipeline, Pipeline),
        )
        metric, mode, engine_options = _merge_options(
            options,
            metric=metric,
            mode=mode,
            acquisition=acquisition,
            budget=budget,
            n_warmup=n_warmup,
            seed=seed,
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
            "cost": cost,
            "cost_key": cost_key,
            "lookahead": lookahead,
            "batch_size": batch_size,
        }
        self._given = {name for name, value in given.items() if value is not None}
        self._given_options = _explicit_fields(
            options, acquisition=acquisition, budget=budget, n_warmup=n_warmup, seed=seed
        )
        self._pipeline: Pipeline | None = pipeline
        self._cache = cache
        self._options = engine_options
        self._max_concurrent = max_concurrent or 0
        self._cost = cost or "time"
        self._cost_key = cost_key or (R.TOTAL_ENERGY_JOULES if cost == "energy" else "time_total_s")
        self._points = _copy_points(points_to_evaluate)
        # The space the searcher encodes: the pipeline's declared space (with the
        # entries of a Tuner's param_space in place), or the plain space as given.
        self._space: dict[str, Any] | None = None
        self._layout: PathLayout | None = None  # plain spaces: nested <-> flat keys
        if pipeline is not None:
            self._use_space(pipeline.search_space)
        elif space is not None:
            self._use_space(space)
        self._lookahead = lookahead
        self._batch_size: int | str = batch_size or "auto"
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
        payload = _dump(self._state(), self._pipeline)
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
                "cost": self._cost,
                "cost_key": self._cost_key,
                "lookahead": self._lookahead,
                "batch_size": self._batch_size,
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
        for name in ("cache", "max_concurrent", "cost", "cost_key", "lookahead", "batch_size"):
            if name not in self._given and name in search:
                setattr(self, f"_{name}", search[name])

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
            self._options = _options_of_older(state)
        if self._pending_state is not None and self._ready():
            self._build_engine()

    # ------------------------------------------------------------- progress
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
        if self._lookahead is not None:
            return self._lookahead
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
        if self._batch_size != "auto":
            return int(self._batch_size)
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

    def _with_cost(self, result: dict[str, Any] | None) -> dict[str, Any] | None:
        if self._cost == "energy" and result is not None:
            result = self._energy_as_cost(result)
        if result is None or self._pipeline is not None:
            return result
        if R.STAGE_COST in result or self._cost_key not in result:
            return result
        cost = result[self._cost_key]
        return {**result, R.STAGE_COST: cost, R.COMPUTE_COST: cost}

    def _energy_as_cost(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with joules in the engine's cost fields (``cost="energy"``).

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
                    f"EEIPUSearcher(cost='energy'): the result has no {self._cost_key!r} "
                    "(joules); report measured energy under that key or pass cost_key="
                )
            return result
        if R.reports_time_costs(result) and not R.reports_energy(result):
            sources = sorted({str(v) for v in R.stage_entries(result, R.ENERGY_SOURCE).values()})
            raise EnergyMeterError(
                "EEIPUSearcher(cost='energy'): a trial reported costs but no measured energy "
                f"(energy sources: {sources or ['none']}): no energy meter works where it ran. "
                "Run trials on nodes with NVIDIA GPUs (NVML, the 'energy' extra) or readable "
                "RAPL counters, or use cost='time'"
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


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _check_arguments(
    *,
    pipeline: Any,
    space: Any,
    metric: Any,
    mode: Any,
    options: Any,
    max_concurrent: Any,
    batch_size: Any,
    cost: Any,
    cost_key: Any,
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
    if batch_size not in (None, "auto") and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise SearcherOptionsError(f"batch_size={batch_size!r} must be 'auto' or an int >= 1")
    if cost not in (None, "time", "energy"):
        raise SearcherOptionsError(f"cost={cost!r} must be 'time' or 'energy'")
    if cost_key is not None and (not isinstance(cost_key, str) or not cost_key):
        raise SearcherOptionsError(f"cost_key={cost_key!r} must be a non-empty string")


def _copy_points(points: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
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


def _explicit_fields(options: EngineOptions | None, **arguments: Any) -> set[str]:
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


def _merge_options(
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


def _dump(state: dict[str, Any], pipeline: Pipeline | None) -> bytes:
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


def _options_of_older(state: Mapping[str, Any]) -> EngineOptions:
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


def _layout_of(space: Mapping[str, Any]) -> PathLayout:
    from eeipu_ray.search.paths import PathLayout  # the search package loads torch

    return PathLayout.of(space)


def _mentions_domain(value: Any) -> bool:
    from eeipu_ray.search.space import mentions_domain

    return mentions_domain(value)
