"""`EEIPUSearcher`: the EEIPU engine as a Ray Tune ``Searcher``.

A thin adapter: the Ray-free :class:`~eeipu_ray.search.BOEngine` does the
Bayesian optimization; this class translates Tune's calls, asks the prefix
cache which prefixes can be loaded, pins the ones the engine means to reuse,
and checkpoints the engine's state atomically for ``Tuner.restore``.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import os
import pickle
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from eeipu_ray.errors import EEIPUError

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline import Pipeline
    from eeipu_ray.search import BOEngine, EngineOptions
    from eeipu_ray.search.engine import Decision

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class SearcherStateError(EEIPUError, RuntimeError):
    """The searcher was used before it knew its search space, or a checkpoint does not fit."""


class EEIPUSearcher(Searcher):
    """Memoization-aware, cost-aware Bayesian optimization (EEIPU) for Ray Tune.

    With a :class:`~eeipu_ray.pipeline.Pipeline`, trials run
    ``pipeline.as_trainable(cache=...)`` and report per-stage costs; the
    searcher learns one cost GP per stage and prefers candidates that reuse a
    cached prefix when that buys more expected improvement per unit of cost
    (Essofi et al., arXiv 2411.03731). Without a pipeline it is a cost-aware BO
    searcher over a plain Tune search space: the cost of a trial is read from
    ``cost_key`` (``time_total_s`` by default).

    Args:
        pipeline: The pipeline being tuned (its nested search space is used),
            or ``None`` for a plain search space.
        metric: The metric to optimize (or set by ``TuneConfig(metric=...)``).
        mode: ``"max"`` or ``"min"`` (or set by ``TuneConfig(mode=...)``).
        budget: Total cost the search may spend, in the trials' cost unit
            (seconds); ``Searcher.FINISHED`` is returned once it is spent.
            ``None``: no budget (no cost cooling).
        cache: The prefix cache the trials use; the searcher asks it which
            prefixes are still cached and pins the ones it plans to reuse.
        acquisition: ``"eeipu"`` (default), ``"ei"``, ``"eips"``, ``"carbo"``, ``"random"``.
        space: A Tune search space, when there is no pipeline (or given to
            ``Tuner(param_space=...)``).
        points_to_evaluate: Configs to try first.
        n_warmup: Initial design size.
        seed: Seeds the initial design and the optimizer.
        max_concurrent: Most trials running at once (0: no limit of its own;
            Tune then starts trials as resources allow, one pending at a time
            unless ``TUNE_MAX_PENDING_TRIALS_PG`` says more). ``ConcurrencyLimiter``
            sets it too.
        cost_key: Result key holding a plain trainable's cost.
        lookahead: Compute the next BO proposal in a background thread as soon
            as a suggestion is handed out, so a freed trial slot is refilled at
            once instead of after a full acquisition optimization
            (asynchronous BO: the proposal sees the trials running at that
            moment as pending, not the result that frees the slot). ``None``
            (default): on when ``max_concurrent > 1``, or with no limit
            (``0``) whenever more than one trial is running; a sequential
            search (``max_concurrent=1``) stays exact.
        options: Further :class:`~eeipu_ray.search.EngineOptions` (restarts,
            samples, top-Q, ...); the arguments above override its fields.

    Example:
        >>> searcher = EEIPUSearcher(pipeline, metric="score", mode="max",
        ...                          budget=3600.0, cache=cache, max_concurrent=4)
        >>> tune.Tuner(pipeline.as_trainable(cache=cache, metric="score"),
        ...            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1)).fit()
    """

    def __init__(
        self,
        pipeline: Pipeline | None = None,
        metric: str | None = None,
        mode: str | None = None,
        budget: float | None = None,
        cache: PrefixCache | None = None,
        acquisition: str = "eeipu",
        *,
        space: Mapping[str, Any] | None = None,
        points_to_evaluate: Sequence[Mapping[str, Any]] | None = None,
        n_warmup: int = 10,
        seed: int = 0,
        max_concurrent: int = 0,
        cost_key: str = "time_total_s",
        options: EngineOptions | None = None,
        lookahead: bool | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        if pipeline is not None and space is not None:
            raise SearcherStateError("give either a pipeline or a space, not both")
        if not isinstance(max_concurrent, int) or max_concurrent < 0:
            raise ValueError(f"max_concurrent={max_concurrent!r} must be an int >= 0")
        self._pipeline = pipeline
        self._cache = cache
        self._budget = budget
        self._acquisition = acquisition
        self._n_warmup = n_warmup
        self._seed = seed
        self._max_concurrent = max_concurrent
        self._cost_key = cost_key
        self._base_options = options
        self._points = [copy.deepcopy(dict(p)) for p in points_to_evaluate or []]
        self._space = (
            dict(pipeline.search_space)
            if pipeline is not None
            else (dict(space) if space is not None else None)
        )
        self._engine: BOEngine | None = None
        self._pinned: set[str] = set()
        self._pending_state: dict[str, Any] | None = None
        self._n_evaluated = 0
        self._lookahead = lookahead
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future[Any] | None = None
        self._ready: Any = None  # a finished lookahead proposal
        if self._space is not None and metric is not None and mode is not None:
            self._build_engine()

    # ------------------------------------------------------------ set-up
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        if self._engine is not None:
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        if self._space is None:
            if not config:
                return False
            self._space = dict(config)
        self._build_engine()
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = max_concurrent
        return True

    def _build_engine(self) -> None:
        from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace

        if self._metric is None or self._mode is None:
            raise SearcherStateError(
                "EEIPUSearcher needs metric and mode: pass them to the searcher or to "
                "tune.TuneConfig(metric=..., mode=...)"
            )
        assert self._space is not None
        stage_order = self._pipeline.stage_names if self._pipeline is not None else None
        space = SearchSpace.from_tune(self._space, stage_order=stage_order)
        options = replace(
            self._base_options or EngineOptions(),
            acquisition=self._acquisition,
            budget=self._budget,
            metric=self._metric,
            mode=self._mode,
            n_warmup=self._n_warmup,
            seed=self._seed,
        )
        self._engine = BOEngine(space, options)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    @property
    def engine(self) -> BOEngine:
        if self._engine is None:
            raise SearcherStateError(
                "EEIPUSearcher has no search space yet: give it a pipeline or space, or pass "
                "param_space to tune.Tuner"
            )
        return self._engine

    # ------------------------------------------------------------ Tune API
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        engine = self.engine
        if self._max_concurrent and len(engine.store.pending) >= max(1, self._max_concurrent):
            return None
        if self._points:
            config = self._points.pop(0)
            if engine.budget_left <= 0:
                return Searcher.FINISHED
            engine.register(trial_id, config, prefix_keys_of=self._keys_of())
            return copy.deepcopy(config)
        config = engine.suggest(
            trial_id,
            available_prefixes=self._available(),
            prefix_keys_of=self._keys_of(),
            lookahead=self._take_lookahead(),
        )
        if config is not None and self._lookahead_on():
            compute = engine.lookahead(self._available())
            if compute is not None:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="eeipu-lookahead"
                    )
                self._future = self._executor.submit(compute)
        if config is None:
            logger.info(
                "EEIPUSearcher: budget spent (%.4g of %s); no more trials",
                engine.budget_spent,
                self._budget,
            )
            return Searcher.FINISHED
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Intermediate results are not used: costs arrive with the final result."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        engine = self.engine
        if trial_id not in engine.store:
            logger.warning("EEIPUSearcher: result for unknown trial %s ignored", trial_id)
            return
        engine.on_result(trial_id, self._with_cost(result), error=error)
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
            trial_id, parameters, {self._metric: value}, error=bool(error or pruned)
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
                self.engine.add_evaluated(trial_id, config, self._with_cost(dict(outcome)))
            else:
                self.add_evaluated_point(dict(config), float(outcome))

    # ------------------------------------------------------- checkpointing
    def save(self, checkpoint_path: str) -> None:
        """Write the state atomically (temporary file, then ``os.replace``)."""
        state = self._state()
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        tmp = os.path.join(directory, f".{os.path.basename(checkpoint_path)}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            pickle.dump(state, fh, protocol=5)
        os.replace(tmp, checkpoint_path)

    def _state(self) -> dict[str, Any]:
        """The versioned checkpoint: what ``save`` writes and pickling ships."""
        self._settle()  # no fit may run while the GP states are read
        return {
            "format": CHECKPOINT_FORMAT,
            "engine": self.engine.state_dict(),
            "points_to_evaluate": self._points,
            "pinned": sorted(self._pinned),
            "n_evaluated": self._n_evaluated,
        }

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise SearcherStateError(
                f"{checkpoint_path!r} is not an EEIPUSearcher checkpoint of format "
                f"{CHECKPOINT_FORMAT}"
            )
        if self._engine is None:
            self._pending_state = state  # loaded once the space is known
        else:
            self._load(state)

    def _load(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self._points = list(state.get("points_to_evaluate", []))
        self._pinned = set(state.get("pinned", []))
        self._n_evaluated = int(state.get("n_evaluated", 0))
        self._sync_pins()

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles the searcher: ship the engine as its plain state, not
        # as fitted GPs.
        state = self.__dict__.copy()
        state["_executor"] = state["_future"] = state["_ready"] = None
        if self._engine is not None:
            state["_pending_state"] = self._state()
            state["_engine"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._pending_state is not None and self._space is not None and self._metric:
            pending, self._pending_state = self._pending_state, None
            self._build_engine()
            self.engine.load_state_dict(pending["engine"])

    # ------------------------------------------------------------- progress
    @property
    def budget(self) -> float | None:
        """The cost budget of the search (``None``: unlimited)."""
        return self._budget

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
        """Wait for the lookahead in flight, if any, and keep its proposal."""
        future, self._future = self._future, None
        if future is None:
            return
        try:
            self._ready = future.result()
        except Exception:  # the synchronous path computes (and raises) again
            logger.warning("EEIPUSearcher: lookahead proposal failed", exc_info=True)

    def _take_lookahead(self) -> Any:
        self._settle()
        proposal, self._ready = self._ready, None
        return proposal

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
        if result is None or self._pipeline is not None:
            return result
        if "stage_costs" in result or self._cost_key not in result:
            return result
        cost = result[self._cost_key]
        return {**result, "stage_costs": cost, "compute_costs": cost}

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
