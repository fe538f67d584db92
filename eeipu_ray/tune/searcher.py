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

from eeipu_ray.errors import ConfigError, EEIPUError

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline import Pipeline
    from eeipu_ray.search import BOEngine, EngineOptions
    from eeipu_ray.search.engine import Decision, Proposal

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


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

    Args:
        pipeline: The pipeline being tuned (its nested search space is used),
            or ``None`` for a plain search space.
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
        space: A Tune search space, when there is no pipeline (or given to
            ``Tuner(param_space=...)``).
        points_to_evaluate: Configs to try first.
        n_warmup: Initial design size.
        seed: Seeds the initial design and the optimizer.
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
        cost: str = "time",
        cost_key: str | None = None,
        options: EngineOptions | None = None,
        lookahead: bool | None = None,
        batch_size: int | str = "auto",
    ) -> None:
        # Ray's Searcher asserts on these; say what is wrong instead.
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise SearcherOptionsError(f"metric={metric!r} must be a non-empty string or None")
        if mode not in (None, "min", "max"):
            raise SearcherOptionsError(f"mode={mode!r} must be 'min', 'max' or None")
        super().__init__(metric=metric, mode=mode)
        if pipeline is not None and space is not None:
            raise SearcherStateError("give either a pipeline or a space, not both")
        if not isinstance(max_concurrent, int) or max_concurrent < 0:
            raise SearcherOptionsError(f"max_concurrent={max_concurrent!r} must be an int >= 0")
        if batch_size != "auto" and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise SearcherOptionsError(f"batch_size={batch_size!r} must be 'auto' or an int >= 1")
        self._pipeline = pipeline
        self._cache = cache
        self._budget = budget
        self._acquisition = acquisition
        self._n_warmup = n_warmup
        self._seed = seed
        self._max_concurrent = max_concurrent
        if cost not in ("time", "energy"):
            raise SearcherOptionsError(f"cost={cost!r} must be 'time' or 'energy'")
        self._cost = cost
        self._cost_key = cost_key or ("total_energy_joules" if cost == "energy" else "time_total_s")
        self._base_options = options
        for i, point in enumerate(points_to_evaluate or []):
            if not isinstance(point, Mapping):
                raise ConfigError(
                    f"points_to_evaluate[{i}] must be a config mapping, got "
                    f"{type(point).__name__}: {point!r:.200}"
                )
        self._points = [copy.deepcopy(dict(p)) for p in points_to_evaluate or []]
        if pipeline is not None:
            self._check_points(pipeline)
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
        self._batch_size = batch_size
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future[Any] | None = None
        self._queue: list[Proposal] = []  # finished lookahead proposals, oldest first
        self._timing = _Timing()
        self._last_results: dict[str, dict[str, Any]] = {}  # by running trial
        if self._space is not None and metric is not None and mode is not None:
            self._build_engine()

    # ------------------------------------------------------------ set-up
    def _check_points(self, pipeline: Pipeline) -> None:
        """Refuse, now and naming it, a point outside the pipeline's declared space
        (its trial would run it, but the searcher encodes observations in that space).

        Raises:
            ConfigError: ``points_to_evaluate[i]`` does not fit the pipeline's space.
        """
        for i, point in enumerate(self._points):
            try:
                pipeline.check_config(point)
            except ConfigError as exc:
                raise ConfigError(f"points_to_evaluate[{i}]: {exc}") from exc

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
        if engine.budget_left > 0 and not engine.can_start():
            return None  # the running trials are expected to spend the rest: wait
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
        if config is not None:
            self._timing.started(trial_id)
            if self._lookahead_on():
                self._refill()
        if config is None:
            logger.info(
                "EEIPUSearcher: budget spent (%.4g of %s); no more trials",
                engine.budget_spent,
                self._budget,
            )
            return Searcher.FINISHED
        return config

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
        state["_executor"] = state["_future"] = None
        state["_queue"] = []
        state["_timing"] = _Timing()
        if self._engine is not None:
            state["_pending_state"] = self._state()
            state["_engine"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_last_results", {})  # pickled by an older version
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
        if "stage_costs" in result or self._cost_key not in result:
            return result
        cost = result[self._cost_key]
        return {**result, "stage_costs": cost, "compute_costs": cost}

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
            if self._cost_key in result or "stage_costs" in result:
                return result
            if "time_total_s" in result or "total_cost" in result:
                raise EnergyMeterError(
                    f"EEIPUSearcher(cost='energy'): the result has no {self._cost_key!r} "
                    "(joules); report measured energy under that key or pass cost_key="
                )
            return result
        energy = {
            f"stage_costs/{k[len('energy_joules/') :]}": v
            for k, v in result.items()
            if k.startswith("energy_joules/")
        }
        energy.update(
            (f"compute_costs/{k[len('compute_energy_joules/') :]}", v)
            for k, v in result.items()
            if k.startswith("compute_energy_joules/")
        )
        if "total_energy_joules" in result:
            energy["total_cost"] = result["total_energy_joules"]
        has_time_costs = "total_cost" in result or any(k.startswith("stage_costs/") for k in result)
        if has_time_costs and not energy:
            sources = sorted({str(v) for k, v in result.items() if k.startswith("energy_source/")})
            raise EnergyMeterError(
                "EEIPUSearcher(cost='energy'): a trial reported costs but no measured energy "
                f"(energy sources: {sources or ['none']}): no energy meter works where it ran. "
                "Run trials on nodes with NVIDIA GPUs (NVML, the 'energy' extra) or readable "
                "RAPL counters, or use cost='time'"
            )
        kept = {
            k: v
            for k, v in result.items()
            if k != "total_cost" and not k.startswith(("stage_costs/", "compute_costs/"))
        }
        return {**kept, **energy}

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
