"""The BO engine: suggest configs, learn from results, account for the budget.

Ray-free: it works on plain trial ids and config dicts; the Ray Tune searcher
(:mod:`eeipu_ray.tune`) is a thin adapter around it.

One step of :meth:`BOEngine.suggest`:

1. Budget spent? Return ``None``.
2. Warm-up (the first ``n_warmup`` suggestions, or fewer than 2 completed
   trials): the next point of a scrambled Sobol sequence.
3. Otherwise fit the objective GP (and the cost GPs the acquisition needs),
   warm-started, only when new results arrived since the last fit.
4. Condition the objective GP on the pending trials (kriging believer), build
   the acquisition (EEIPU / EI / EIPS / CArBO) with the cost-cooling ``eta``.
5. Maximize it over the prefix pool (:mod:`eeipu_ray.search.optimize`); the
   winner's prefix stages are copied verbatim from the source trial's config,
   so its prefix keys match the cached entry's.

Every suggestion is logged as a :class:`Decision` (phase, ``eta``, planned
prefix, budget spent, acquisition value): :attr:`BOEngine.decisions`, kept in
the checkpoint, is what reports plot the cost-cooling schedule from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from eeipu_ray.search.acquisition import (
    CachedPrefixes,
    CostAwareLogEI,
    RandomProposer,
    suffix_cost,
)
from eeipu_ray.search.design import cheap_and_diverse
from eeipu_ray.search.errors import (
    AcquisitionError,
    AcquisitionWarning,
    EngineOptionsError,
    EngineStateError,
    TrialStateError,
)
from eeipu_ray.search.models import (
    KERNELS,
    WARPINGS,
    FitOptions,
    GPFitter,
    MarginalGP,
    SurrogateModels,
    fit_surrogates,
)
from eeipu_ray.search.optimize import (
    Candidate,
    OptimizeOptions,
    Prefix,
    build_prefix_pool,
    prefix_ident,
    rank_over_pool,
)
from eeipu_ray.search.records import (
    TrialRecord,
    TrialStatus,
    TrialStore,
    check_trial_id,
    cost_sum,
)
from eeipu_ray.search.space import SearchSpace
from eeipu_ray.search.strategies import (
    AcquisitionInputs,
    AcquisitionStrategy,
    CostModels,
    get_strategy,
)

logger = logging.getLogger(__name__)

# built in; see search.strategies
ACQUISITIONS = ("eeipu", "ei", "eips", "carbo", "eeipu_gittins", "random")
STATE_FORMAT = 1
_MIN_OBSERVATIONS = 2  # completed trials before the GP is trusted
_BATCH_RAW_CANDIDATES = 32  # best raw samples per prefix kept as batch candidates

AvailablePrefixes = Callable[[str], bool] | Collection[str] | None
PrefixKeysOf = Callable[[Any], list[str]] | None


@dataclass(frozen=True)
class EngineOptions:
    """Options of :class:`BOEngine`, validated once.

    Attributes:
        acquisition: ``"eeipu"``, ``"ei"``, ``"eips"``, ``"carbo"``, ``"random"``,
            or the name of a strategy registered in :mod:`eeipu_ray.search.strategies`.
        budget: Total cost units (seconds, joules, ...) the search may spend;
            ``None`` for unlimited (then ``eta`` stays 1: no cost cooling).
        metric: Name of the objective in the results.
        mode: ``"max"`` or ``"min"``.
        n_warmup: Sobol points before BO starts.
        top_q: Observations whose prefixes enter the pool.
        num_restarts: L-BFGS-B restarts for the empty prefix (prefixes that fix
            dimensions get a share proportional to their free dimensions).
        raw_samples: Raw samples per prefix.
        maxiter: L-BFGS-B iterations per restart.
        mc_samples: QMC samples of the cost posterior.
        seed: Seeds the warm-up design, random search and the optimizer.
        cost_model_upstream: Stage ``k``'s cost GP sees stages ``1..k`` (else ``k``).
        load_cost_prior: Prior cost of loading one cached stage, in cost units.
        fit_maxiter_cold: GP fit iterations from the prior.
        fit_maxiter_warm: GP fit iterations warm-started from the last fit.
        refit_growth: Re-optimize GP hyperparameters once the data grew by this
            fraction (see :class:`~eeipu_ray.search.models.FitOptions`); 0: always.
        warmup_design: ``"sobol"`` (default: scrambled Sobol points) or
            ``"cheap"``: once two trials reported costs, each warm-up point
            survives alternate elimination of the costliest and least novel of
            ``warmup_candidates`` Sobol candidates (see
            :mod:`eeipu_ray.search.design`). Not the default: it bought more
            BO iterations but a worse best objective
            (``benchmarks/results/warmup_design.md``).
        warmup_candidates: Candidates per cheap warm-up point.
        pool_source: Which observations' prefixes enter the prefix pool:
            ``"all"`` (the top ``top_q`` of every completed trial) or ``"bo"``
            (of the BO trials only, as the reference implementation: warm-up
            points never seed the pool).
        pool_distinct: Take at most one trial per first-stage configuration
            into the pool (the best of each lineage), so the pool spans
            ``top_q`` distinct upstream lineages instead of the variants of one.
        cooling: The cost-cooling schedule of the cooled acquisitions (EEIPU,
            CArBO): ``"after_warmup"`` (``eta = (B - s) / (B - s_0)``, 1 at the
            first BO step) or ``"budget"`` (``eta = (B - s) / B``: the budget
            the warm-up spent counts as cooled already).
        objective_warping: A monotone transform of the objectives before the
            objective GP (:func:`~eeipu_ray.search.models.warp_objective`):
            ``"power"`` (default: Yeo-Johnson), ``"copula"`` (normal scores of
            the ranks) or ``"none"``. Warping keeps a few configurations far
            worse than the rest from flattening the GP (measurements:
            ``benchmarks/results/evaluate_synthetic.md``).
        objective_kernel: The objective GP's kernel: ``"joint"`` (one
            Matern-5/2 ARD kernel over every dimension) or ``"stage_additive"``
            (that kernel plus one per stage over the stage's own dimensions,
            :func:`~eeipu_ray.search.models.make_kernel`).
        cost_overhead: A fixed cost added to every candidate's cost in the
            memoization-aware acquisitions, as a fraction of a typical whole
            run (the sum of the stages' geometric-mean costs). With 0 a
            candidate that loads a costly prefix is charged only its remaining
            stages, and EI per unit cost then pulls those stages to their
            cheapest corner whatever the objective does there; an overhead
            bounds that pull while a cached prefix still makes a candidate
            several times cheaper than a full run.
        prefix_patience: Stop favouring a cached prefix after this many trials
            that share it without a new incumbent among them (``None``: never).
            Such a prefix leaves the pool and is priced as if uncached, so its
            candidates compete with fresh ones at their full cost; a new
            incumbent among the trials that share it makes it favoured again.
            Without a limit, near-uniform stage costs let a cached prefix make
            a last-stage change several times cheaper than an upstream one,
            and a search can spend long runs varying only the last stage of a
            lineage whose upstream stages are poor (:meth:`BOEngine.stale_prefixes`).
            Off by default: on the design seeds it did not improve the best
            found (``benchmarks/results/evaluate_synthetic.md``).
        cost_free_every: Every this many BO steps, one step of an acquisition
            with a cost exponent (EEIPU, CArBO, the Gittins index) ignores
            cost (``eta = 0``: EI over the prefix pool), so that cheap regions
            and cached prefixes cannot hold the search for good (``None``:
            never). Off by default: on the design seeds it did not improve
            the best found (``benchmarks/results/evaluate_synthetic.md``).
        reserve_pending: Count the expected cost of the running trials against
            the budget (:attr:`BOEngine.budget_committed`): with many trials in
            flight, new ones start only while cost charged plus what the
            running ones are expected to cost is below the budget, so the last
            round does not overshoot it by up to one trial per worker. The
            expected cost of a running trial is the mean charged cost of the
            finished trials that loaded as many cached stages as it plans to
            (all finished trials when none did). ``False``: a trial starts
            while cost charged < budget. Sequential searches are unaffected.
        num_threads: torch intra-op threads while suggesting (restored after);
            ``None`` leaves torch's setting alone. The GPs are small (hundreds of
            points), so one thread is fastest, and the searcher does not fight
            the trials on the head node for cores.
    """

    acquisition: str = "eeipu"
    budget: float | None = None
    metric: str = "score"
    mode: str = "max"
    n_warmup: int = 10
    top_q: int = 5
    num_restarts: int = 10
    raw_samples: int = 512
    maxiter: int = 50
    mc_samples: int = 256
    seed: int = 0
    cost_model_upstream: bool = True
    load_cost_prior: float = 0.1
    fit_maxiter_cold: int = 200
    fit_maxiter_warm: int = 40
    refit_growth: float = 0.1
    num_threads: int | None = 1
    warmup_design: str = "sobol"
    warmup_candidates: int = 16
    reserve_pending: bool = True
    pool_source: str = "all"
    pool_distinct: bool = False
    cooling: str = "after_warmup"
    objective_warping: str = "power"
    objective_kernel: str = "joint"
    cost_overhead: float = 0.0
    prefix_patience: int | None = None
    cost_free_every: int | None = None

    def __post_init__(self) -> None:
        get_strategy(self.acquisition)  # raises EngineOptionsError naming the choices
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int | float):
                raise EngineOptionsError(f"budget={self.budget!r} must be a number or None")
            if not (math.isfinite(self.budget) and self.budget > 0):
                raise EngineOptionsError(f"budget={self.budget!r} must be finite and > 0")
        if not isinstance(self.metric, str) or not self.metric:
            raise EngineOptionsError(f"metric={self.metric!r} must be a non-empty string")
        if self.mode not in ("max", "min"):
            raise EngineOptionsError(f"mode={self.mode!r} must be 'max' or 'min'")
        _check_int(self, "n_warmup", 1)
        _check_int(self, "top_q", 0)
        for name in ("num_restarts", "raw_samples", "maxiter", "mc_samples"):
            _check_int(self, name, 1)
        for name in ("fit_maxiter_cold", "fit_maxiter_warm"):
            _check_int(self, name, 1)
        _check_int(self, "seed", 0)
        _check_int(self, "warmup_candidates", 1)
        if self.warmup_design not in ("sobol", "cheap"):
            raise EngineOptionsError(
                f"warmup_design={self.warmup_design!r} is not one of ('sobol', 'cheap')"
            )
        if self.num_threads is not None:
            _check_int(self, "num_threads", 1)
        _check_nonnegative(self, "refit_growth")
        if self.pool_source not in ("all", "bo"):
            raise EngineOptionsError(
                f"pool_source={self.pool_source!r} is not one of ('all', 'bo')"
            )
        if not isinstance(self.pool_distinct, bool):
            raise EngineOptionsError(f"pool_distinct={self.pool_distinct!r} must be a bool")
        if self.cooling not in ("after_warmup", "budget"):
            raise EngineOptionsError(
                f"cooling={self.cooling!r} is not one of ('after_warmup', 'budget')"
            )
        _check_nonnegative(self, "cost_overhead")
        if self.prefix_patience is not None:
            _check_int(self, "prefix_patience", 1)
        if self.cost_free_every is not None:
            _check_int(self, "cost_free_every", 1)
        if self.objective_kernel not in KERNELS:
            raise EngineOptionsError(
                f"objective_kernel={self.objective_kernel!r} is not one of {KERNELS}"
            )
        if self.objective_warping not in WARPINGS:
            raise EngineOptionsError(
                f"objective_warping={self.objective_warping!r} is not one of {WARPINGS}"
            )
        if not isinstance(self.reserve_pending, bool):
            raise EngineOptionsError(f"reserve_pending={self.reserve_pending!r} must be a bool")
        if not isinstance(self.cost_model_upstream, bool):
            raise EngineOptionsError(
                f"cost_model_upstream={self.cost_model_upstream!r} must be a bool"
            )
        if not (isinstance(self.load_cost_prior, int | float) and self.load_cost_prior > 0):
            raise EngineOptionsError(f"load_cost_prior={self.load_cost_prior!r} must be > 0")


PrefixId = tuple[int, tuple[float, ...]]
"""A prefix's depth and its stages' cube coordinates (:meth:`BOEngine.stale_prefixes`)."""


@dataclass
class _ModelCache:
    version: int = -1  # TrialStore.version the models were fitted at
    models: SurrogateModels | None = None
    fitter: GPFitter | None = None


@dataclass(frozen=True)
class _AcquisitionParts:
    """The models of one BO step, shared by every acquisition of a batch."""

    models: SurrogateModels
    eta: float
    costs: CostModels


@dataclass(frozen=True)
class Proposal:
    """A BO step's outcome before it is given a trial id (see :meth:`BOEngine.lookahead`).

    Attributes:
        config: The proposed config.
        planned_depth: Leading stages it expects to load from the cache.
        source_trial: The trial whose cached prefix it extends, if any.
        version: The store version (completed results) it was computed at.
        eta: The cost exponent its acquisition used.
        acquisition_value: The winning candidate's (log) acquisition value;
            ``None`` when every candidate repeated a tried config and a random
            point was taken instead.
    """

    config: dict[str, Any]
    planned_depth: int
    source_trial: str | None
    version: int
    eta: float = 1.0
    acquisition_value: float | None = None


@dataclass(frozen=True)
class Decision:
    """One suggestion, as the engine made it: the decision log that reports read
    to show the cost-cooling schedule and where cached prefixes were reused.

    Attributes:
        trial_id: The trial the config was suggested for.
        phase: ``"warmup"``, ``"bo"``, ``"random"``, or ``"given"`` (a config the
            caller chose, see :meth:`BOEngine.register`).
        eta: The cost exponent of the decision. A BO step: the one its
            acquisition used (computed with the proposal, which under a
            lookahead is a little before the hand-out); otherwise the value
            :attr:`BOEngine.eta` had (1 during warm-up for EEIPU and CArBO, 0 for
            EI and random search).
        budget_spent: Cost charged by finished trials when the config was handed out.
        planned_prefix_depth: Leading stages expected to be loaded from the cache.
        source_trial: The trial whose cached prefix the config extends (BO steps
            that reuse a prefix), else ``None``.
        acquisition_value: The chosen candidate's acquisition value, on the
            acquisition's scale (``log EI + eta log E[1/C]`` for EEIPU, the
            index in standard deviations of the observations for ``eeipu_gittins``);
            ``None`` when no acquisition chose the config.
    """

    trial_id: str
    phase: str
    eta: float
    budget_spent: float
    planned_prefix_depth: int = 0
    source_trial: str | None = None
    acquisition_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (``decisions.json`` of ``eeipu-ray run``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`."""
        value = data.get("acquisition_value")
        source = data.get("source_trial")
        return cls(
            trial_id=str(data["trial_id"]),
            phase=str(data["phase"]),
            eta=float(data["eta"]),
            budget_spent=float(data["budget_spent"]),
            planned_prefix_depth=int(data.get("planned_prefix_depth", 0)),
            source_trial=None if source is None else str(source),
            acquisition_value=None if value is None else float(value),
        )


class BOEngine:
    """Memoization- and cost-aware Bayesian optimization on a :class:`SearchSpace`.

    Args:
        space: The encoded search space.
        options: The engine's options.

    Example:
        >>> from ray import tune
        >>> space = SearchSpace.from_tune({"a": {"x": tune.uniform(0, 1)},
        ...                                "b": {"y": tune.uniform(0, 1)}})
        >>> engine = BOEngine(space, EngineOptions(acquisition="ei", budget=10.0, n_warmup=2))
        >>> config = engine.suggest("t0")
        >>> engine.on_result("t0", {"score": 1.0, "stage_costs/a": 1.0, "stage_costs/b": 2.0})
        >>> engine.budget_spent
        3.0
    """

    def __init__(self, space: SearchSpace, options: EngineOptions | None = None) -> None:
        self.space = space
        self.options = options or EngineOptions()
        self.store = TrialStore(
            space.stage_names, metric=self.options.metric, mode=self.options.mode
        )
        self.strategy: AcquisitionStrategy = get_strategy(self.options.acquisition)
        self._n_warmup_drawn = 0
        self._spent_after_warmup: float | None = None
        self._decisions: dict[str, Decision] = {}  # by trial id, in suggestion order
        self._random = RandomProposer(space.dim, seed=self.options.seed)
        self._cache = _ModelCache(fitter=self._new_fitter())
        self._prefix_dims = [space.dims_of_prefix(k) for k in range(space.n_stages + 1)]
        self._stage_dims = [space.dims_of_stage(k) for k in range(space.n_stages)]

    # ------------------------------------------------------------- budget
    @property
    def budget_spent(self) -> float:
        """Cost charged by finished trials (failures included)."""
        return self.store.budget_spent

    @property
    def budget_left(self) -> float:
        """``budget - budget_spent`` (``inf`` when the budget is unlimited)."""
        if self.options.budget is None:
            return math.inf
        return self.options.budget - self.budget_spent

    @property
    def budget_committed(self) -> float:
        """``budget_spent`` plus the expected cost of the pending trials (see
        ``EngineOptions.reserve_pending``; without it, ``budget_spent``)."""
        pending = self.store.pending
        if not pending or not self.options.reserve_pending:
            return self.budget_spent
        by_depth: dict[int, list[float]] = {}
        for r in self.store:
            if r.finished and r.charged_cost > 0:
                by_depth.setdefault(r.memoized_stages, []).append(r.charged_cost)
        overall = [c for costs in by_depth.values() for c in costs]
        if not overall:
            return self.budget_spent  # nothing to go by yet
        means = {d: cost_sum(c) / len(c) for d, c in by_depth.items()}
        fallback = cost_sum(overall) / len(overall)
        expected = cost_sum(means.get(r.planned_prefix_depth, fallback) for r in pending)
        return self.budget_spent + expected

    def can_start(self) -> bool:
        """Whether the budget leaves room for one more trial now: nothing is
        spent beyond it and (with ``reserve_pending``) the running trials are
        not expected to use up the rest. ``False`` while budget is left means:
        wait for a running trial to finish, then ask again."""
        if self.options.budget is None:
            return True
        return self.budget_left > 0 and self.budget_committed < self.options.budget

    @property
    def eta(self) -> float:
        """The cost exponent the next BO step uses (1 during warm-up; EIPS: 1; EI: 0)."""
        return self._eta(self.budget_spent)

    @property
    def records(self) -> list[TrialRecord]:
        """All trial records, in suggestion order."""
        return list(self.store)

    @property
    def decisions(self) -> list[Decision]:
        """The decision log: one :class:`Decision` per suggested or registered
        trial, in suggestion order (trials added by :meth:`add_evaluated` have none)."""
        return list(self._decisions.values())

    # -------------------------------------------------------------- suggest
    def suggest(
        self,
        trial_id: str,
        available_prefixes: AvailablePrefixes = None,
        prefix_keys_of: PrefixKeysOf = None,
        lookahead: Proposal | None = None,
    ) -> dict[str, Any] | None:
        """Propose the next config for ``trial_id``.

        Args:
            trial_id: A new, unique trial id.
            available_prefixes: Which prefix keys can be loaded now (cached, or
                being produced by a running trial): a predicate, a set of keys, or
                ``None`` to assume every prefix of a known trial stays available
                (an unbounded cache). Prefixes of pending trials always count as
                available ("about to be cached").
            prefix_keys_of: ``prefix_keys_of(config)`` gives the prefix keys of
                stages ``1..k``, ``k = 1..K`` (e.g. ``pipeline.prefix_keys``); used
                to know a pending trial's keys and for :meth:`pins`.
            lookahead: A proposal computed ahead of time by :meth:`lookahead`;
                used for this BO step unless it has gone bad since (its prefix's
                source trial failed, or its config was tried meanwhile).

        Returns:
            The config (same shape as the space), or ``None`` when the budget is
            spent.

        Raises:
            TrialStateError: ``trial_id`` was suggested before.
        """
        check_trial_id(trial_id)
        if trial_id in self.store:
            raise TrialStateError(
                f"trial id {trial_id!r} was already suggested; trial ids must be unique"
            )
        if self.budget_left <= 0:
            return None
        opts = self.options
        available = _as_predicate(available_prefixes)
        proposal: Proposal | None = None
        if self.strategy.proposes_randomly:
            x, phase = self._random.propose(self.n_suggested), "random"
            config = self.space.from_unit(x)
        elif not self.next_is_bo():
            with _torch_threads(opts.num_threads):
                x = self._next_warmup_point(available)
            phase = "warmup"
            config = self.space.from_unit(x)
        else:
            self._enter_bo()
            proposal = lookahead if self._usable(lookahead) else None
            if proposal is None:
                with _torch_threads(opts.num_threads):
                    proposal = self._propose(self.store, available, self.bo_steps)
            config = _copy_config(proposal.config)
            phase = "bo"
        planned_depth = proposal.planned_depth if proposal is not None else 0
        x = self.space.to_unit(config)
        keys = list(prefix_keys_of(config)) if prefix_keys_of is not None else None
        self.store.add_pending(
            trial_id, config, x, phase=phase, prefix_keys=keys, planned_prefix_depth=planned_depth
        )
        self._decisions[trial_id] = Decision(
            trial_id=trial_id,
            phase=phase,
            eta=proposal.eta if proposal is not None else self.eta,
            budget_spent=self.budget_spent,
            planned_prefix_depth=planned_depth,
            source_trial=proposal.source_trial if proposal is not None else None,
            acquisition_value=proposal.acquisition_value if proposal is not None else None,
        )
        return _copy_config(config)

    @property
    def n_suggested(self) -> int:
        """Trials recorded so far (suggested, registered or observed)."""
        return len(self.store)

    @property
    def bo_steps(self) -> int:
        """BO proposals made so far (they seed the acquisition optimizer's draws)."""
        return sum(1 for r in self.store if r.phase == "bo")

    def next_is_bo(self) -> bool:
        """Whether the next :meth:`suggest` is a BO step (not warm-up, not random)."""
        return (
            not self.strategy.proposes_randomly
            and self.n_suggested >= self.options.n_warmup
            and len(self.store.completed) >= _MIN_OBSERVATIONS
            and self.space.dim > 0
        )

    def lookahead(
        self, available_prefixes: AvailablePrefixes = None
    ) -> Callable[[], Proposal] | None:
        """Prepare the next BO step for another thread, while trials run.

        Takes a snapshot of the records now and returns a function that computes
        the proposal on it; pass its result to :meth:`suggest` as ``lookahead``.
        The function touches no live state but the fitted-model cache, so it may
        run in a background thread while this engine records results and
        suggestions, as long as no other BO step runs meanwhile (the caller
        waits for it before a :meth:`suggest` that would compute one, and before
        :meth:`state_dict`). Asynchronous BO with a lookahead of one: the
        proposal treats the trials running now as pending and does not see the
        results that arrive while it is computed.

        Returns:
            The function, or ``None`` when the next step is not a BO step.
        """
        compute = self.lookahead_batch(available_prefixes, 1)
        if compute is None:
            return None
        return lambda: compute()[0]

    def lookahead_batch(
        self,
        available_prefixes: AvailablePrefixes = None,
        q: int = 1,
        reserved: Sequence[Proposal] = (),
    ) -> Callable[[], list[Proposal]] | None:
        """Like :meth:`lookahead`, for up to ``q`` proposals from one optimization.

        For many workers: one acquisition optimization yields a batch (see
        :meth:`_propose_batch`: the first proposal is the sequential step's,
        the others are chosen greedily with the earlier ones as pending
        points), so ``suggest`` keeps up with workers that free a slot faster
        than one optimization runs. Hand the proposals to :meth:`suggest` one
        by one; each is checked again when it is used (:meth:`usable`).

        Args:
            available_prefixes: As for :meth:`suggest`.
            q: Proposals wanted (>= 1).
            reserved: Proposals computed earlier and not handed out yet; the
                new batch treats them as pending, so it does not repeat them.

        Returns:
            The function, or ``None`` when the next step is not a BO step.
        """
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"q={q!r} must be an int >= 1")
        if not self.next_is_bo():
            return None
        self._enter_bo()
        store = self.store.snapshot()
        step = self.bo_steps + len(reserved)
        available = _as_predicate(available_prefixes)
        threads = self.options.num_threads
        configs = [p.config for p in reserved]

        def compute() -> list[Proposal]:
            with _torch_threads(threads):
                return self._propose_batch(store, available, step, q, reserved=configs)

        return compute

    def usable(self, proposal: Proposal | None) -> bool:
        """Whether a proposal computed earlier (:meth:`lookahead_batch`) still makes
        sense now: its prefix's source trial has not failed, and no trial has had
        its config meanwhile."""
        return self._usable(proposal)

    def on_result(
        self, trial_id: str, result: Mapping[str, Any] | None, error: bool | str = False
    ) -> None:
        """Record a trial's final result (idempotent: a repeat is ignored).

        A missing / NaN / infinite metric or ``error`` makes the trial a failure;
        what it spent is charged to the budget all the same.

        Raises:
            TrialStateError: the trial id is unknown.
        """
        self.store.complete(trial_id, result, error=error)

    def register(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        prefix_keys_of: PrefixKeysOf = None,
    ) -> None:
        """Record a trial the caller chose (e.g. from ``points_to_evaluate``) as
        pending, exactly as if :meth:`suggest` had proposed ``config``; it counts
        towards the warm-up."""
        x = self.space.to_unit(config)
        keys = list(prefix_keys_of(config)) if prefix_keys_of is not None else None
        self.store.add_pending(trial_id, _copy_config(config), x, phase="given", prefix_keys=keys)
        self._decisions[trial_id] = Decision(
            trial_id=trial_id, phase="given", eta=self.eta, budget_spent=self.budget_spent
        )

    def add_evaluated(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        result: Mapping[str, Any] | None,
        error: bool | str = False,
    ) -> None:
        """Record a trial the engine did not suggest (e.g. a user's starting point);
        it counts towards the warm-up, as :meth:`register` does."""
        x = self.space.to_unit(config)
        self.store.add_pending(trial_id, _copy_config(config), x, phase="observed")
        self.store.complete(trial_id, result, error=error)

    def pins(self) -> set[str]:
        """Prefix keys the engine means to reuse: proper prefixes of the top-Q trials."""
        keys: set[str] = set()
        for record in self._pool_records(self.store):
            for key in record.prefix_keys[: self.space.n_stages - 1]:
                if isinstance(key, str):
                    keys.add(key)
        return keys

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON-able when configs are), versioned.

        The GP hyperparameters are saved too, so the first fit after a restore
        is warm-started (a cold fit on hundreds of points takes seconds).
        """
        return {
            "format": STATE_FORMAT,
            "space": self.space.signature(),
            "options": asdict(self.options),
            "n_suggested": self.n_suggested,
            "n_warmup_drawn": self._n_warmup_drawn,
            "spent_after_warmup": self._spent_after_warmup,
            "bo_steps": self.bo_steps,
            "records": [r.to_dict() for r in self.store],
            "decisions": [d.to_dict() for d in self._decisions.values()],
            "gp": self._cache.fitter.state_dict() if self._cache.fitter is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (into an engine on the same space).

        Raises:
            EngineStateError: another format version or another search space.
        """
        fmt = state.get("format")
        if fmt != STATE_FORMAT:
            raise EngineStateError(
                f"checkpoint format {fmt!r} is not supported (this version reads {STATE_FORMAT})"
            )
        if list(state.get("space", [])) != self.space.signature():
            raise EngineStateError(
                "checkpoint was written for another search space; restore it into an engine "
                "built on the same space"
            )
        store = TrialStore(
            self.space.stage_names, metric=self.options.metric, mode=self.options.mode
        )
        for data in state["records"]:
            store.add_record(TrialRecord.from_dict(data))
        self.store = store
        self._n_warmup_drawn = int(state["n_warmup_drawn"])
        sa = state.get("spent_after_warmup")
        self._spent_after_warmup = None if sa is None else float(sa)
        # Checkpoints written before the decision log existed restore with an empty one.
        decisions = [Decision.from_dict(d) for d in state.get("decisions", [])]
        self._decisions = {d.trial_id: d for d in decisions}
        self._cache = _ModelCache(fitter=self._new_fitter())
        gp = state.get("gp")
        if isinstance(gp, Mapping) and self._cache.fitter is not None:
            self._cache.fitter.load_state_dict(gp)

    # ------------------------------------------------------------ internals
    def _new_fitter(self) -> GPFitter:
        categories = [d.n if d.kind == "categorical" else 0 for d in self.space.dims]
        return GPFitter(
            categories,
            FitOptions(
                maxiter_cold=self.options.fit_maxiter_cold,
                maxiter_warm=self.options.fit_maxiter_warm,
                refit_growth=float(self.options.refit_growth),
            ),
        )

    def _next_warmup_point(self, available: Callable[[str], bool] | None) -> Tensor:
        # Scrambled Sobol: diverse by construction and reproducible from
        # (seed, index), so a restored engine continues the same design.
        costed = [r for r in self.store if r.finished and r.charged_cost > 0]
        if (
            self.options.warmup_design == "sobol"
            or len(self.store.completed) < _MIN_OBSERVATIONS
            or len(costed) < _MIN_OBSERVATIONS
        ):
            x = self.space.sobol(1, seed=self.options.seed, skip=self._n_warmup_drawn)[0]
            self._n_warmup_drawn += 1
            return x
        m = self.options.warmup_candidates
        candidates = self.space.sobol(m, seed=self.options.seed, skip=self._n_warmup_drawn)
        self._n_warmup_drawn += m
        candidates = self.space.snap(candidates)  # cells, as the configs will be
        new = ~self._is_repeat(candidates, self.store)
        if new.any():
            candidates = candidates[new]
        seen = torch.stack([r.x for r in self.store])
        pick = cheap_and_diverse(candidates, seen, self._predicted_log_cost(candidates, available))
        return candidates[pick]

    def _predicted_log_cost(self, X: Tensor, available: Callable[[str], bool] | None) -> Tensor:
        """Posterior-mean log cost of running each point of ``X`` (``m x d``) now:
        its uncached stages (EEIPU's models) or its whole pipeline (total cost)."""
        models = self._models(self.store)
        with torch.no_grad():
            if models.stage_costs is not None:
                Xq = X.unsqueeze(-2)
                mu = torch.cat([m.posterior(Xq).mean for m in models.stage_costs.models], -1)
                mu = mu.squeeze(-2)  # m x K
                cached = self._cached_prefixes(self.store, available)
                delta = cached.depth(X) if cached else torch.zeros(X.shape[0], dtype=torch.long)
                total = suffix_cost(mu, delta, models.load_costs)
                return torch.log(total.clamp_min(1e-300))
            assert models.total_cost is not None
            return models.total_cost.posterior(X.unsqueeze(-2)).mean.reshape(-1)

    def _models(self, store: TrialStore) -> SurrogateModels:
        strategy = self.strategy
        if self._cache.models is None or self._cache.version != store.version:
            assert self._cache.fitter is not None
            self._cache.models = fit_surrogates(
                self._cache.fitter,
                list(store),
                self._stage_dims,
                need_stage_costs=strategy.needs_stage_costs,
                # A cheap warm-up needs some cost model, even for a cost-blind method.
                need_total_cost=strategy.needs_total_cost
                or (self.options.warmup_design == "cheap" and not strategy.needs_stage_costs),
                upstream=self.options.cost_model_upstream,
                load_prior=self.options.load_cost_prior,
                warping=self.options.objective_warping,
                kernel=self.options.objective_kernel,
            )
            self._cache.version = store.version
        return self._cache.models

    def _eta(self, spent: float) -> float:
        start = self._spent_after_warmup
        if self.options.cooling == "budget" and start is not None:
            start = 0.0  # cooled over the whole budget
        return float(self.strategy.eta(self.options.budget, spent, start))

    def _pool_records(self, store: TrialStore) -> list[TrialRecord]:
        """The observations whose prefixes seed the prefix pool, best first."""
        opts = self.options
        done = store.completed
        if opts.pool_source == "bo":
            done = [r for r in done if r.phase == "bo"]
        order = sorted(range(len(done)), key=lambda i: (-float(done[i].objective or 0.0), i))
        if not opts.pool_distinct or self.space.n_stages < 2:
            return [done[i] for i in order[: opts.top_q]]
        chosen: list[TrialRecord] = []
        lineages: set[tuple[float, ...]] = set()
        first = self._prefix_dims[1]
        for i in order:
            if len(chosen) >= opts.top_q:
                break
            lineage = tuple(round(float(v), 12) for v in done[i].x[first].tolist())
            if lineage in lineages:
                continue
            lineages.add(lineage)
            chosen.append(done[i])
        return chosen

    def stale_prefixes(self, store: TrialStore | None = None) -> set[PrefixId]:
        """The cached prefixes the search no longer favours (``prefix_patience``).

        A prefix, ``(depth, values of its stages' cube dimensions)``, is stale
        once ``prefix_patience`` finished trials that share it came after the
        last one of them that set a new incumbent (the best objective so far,
        in the order the trials were suggested). Empty without a patience.
        """
        patience = self.options.prefix_patience
        store = self.store if store is None else store
        if patience is None or self.space.n_stages < 2:
            return set()
        since: dict[PrefixId, int] = {}
        best = -math.inf
        for record in store.completed:
            value = float(record.objective) if record.objective is not None else -math.inf
            record_set = value > best
            best = max(best, value)
            for depth in range(1, self.space.n_stages):
                ident = prefix_ident(record.x, self._prefix_dims[depth], depth)
                since[ident] = 0 if record_set else since.get(ident, 0) + 1
        return {ident for ident, n in since.items() if n >= patience}

    def _prefix_pool(
        self,
        store: TrialStore,
        available: Callable[[str], bool] | None,
        stale: Collection[PrefixId] = (),
    ) -> list[Prefix]:
        """The prefixes the acquisition is optimized over: the empty one, and for a
        memoization-aware strategy the available proper prefixes of the pool's
        trials that are not stale."""
        if not self.strategy.memoization_aware:
            return [Prefix(depth=0)]
        top = [(r.trial_id, r.x, r.prefix_keys) for r in self._pool_records(store)]

        def is_available(trial_id: str, depth: int, key: str | None) -> bool:
            return _prefix_available(store[trial_id], depth, key, available)

        pool = build_prefix_pool(top, self.space.n_stages, self._prefix_dims, is_available)
        return [
            p
            for p in pool
            if p.depth == 0 or prefix_ident(p.x, self._prefix_dims[p.depth], p.depth) not in stale
        ]

    def _enter_bo(self) -> None:
        if self._spent_after_warmup is None:
            self._spent_after_warmup = self.budget_spent

    def _usable(self, proposal: Proposal | None) -> bool:
        """Whether a lookahead proposal still makes sense now."""
        if proposal is None:
            return False
        source = self.store.get(proposal.source_trial)
        if (
            source is not None
            and source.status is TrialStatus.FAILED
            and not _prefix_available(source, proposal.planned_depth, None, None)
        ):
            logger.debug("lookahead dropped: its prefix's trial %s failed", source.trial_id)
            return False
        x = self.space.snap(self.space.to_unit(proposal.config).unsqueeze(0))
        if bool(self._is_repeat(x, self.store)[0]):
            logger.debug("lookahead dropped: its config was suggested meanwhile")
            return False
        return True

    def _is_repeat(self, X: Tensor, store: TrialStore) -> Tensor:
        """``BoolTensor[m]``: per row of ``X`` (``m x d``, snapped), whether a trial
        of ``store`` has that config."""
        records = list(store)
        if not records:
            return torch.zeros(X.shape[0], dtype=torch.bool)
        seen = self.space.snap(torch.stack([r.x for r in records]))
        return ((X.unsqueeze(-2) - seen).abs() <= 1e-9).all(-1).any(-1)

    def _propose(
        self, store: TrialStore, available: Callable[[str], bool] | None, step: int
    ) -> Proposal:
        return self._propose_batch(store, available, step, 1)[0]

    def _propose_batch(
        self,
        store: TrialStore,
        available: Callable[[str], bool] | None,
        step: int,
        q: int,
        reserved: Sequence[Mapping[str, Any]] = (),
    ) -> list[Proposal]:
        """Up to ``q`` proposals from one acquisition optimization.

        The first is the acquisition's maximizer over the prefix pool (what a
        sequential step proposes). Each further one is chosen greedily from
        the optimizer's candidate set (every restart's end point and the best
        raw samples of every prefix), re-scored after the proposals chosen so
        far joined the pending trials: kriging believer, so EI collapses
        around them, and their prefixes count as about to be cached. Fewer
        than ``q`` come back when the candidates run out of untried configs.

        Args:
            store: The records (a snapshot under a lookahead).
            available: Which prefix keys can be loaded.
            step: The BO step (seeds the optimizer).
            q: Proposals wanted (>= 1).
            reserved: Configs handed out elsewhere but not yet in ``store``
                (proposals queued by the caller): treated as pending.
        """
        opts = self.options
        models = self._models(store)
        eta = self._eta(store.budget_spent)
        if opts.cost_free_every is not None and (step + 1) % opts.cost_free_every == 0:
            eta = 0.0
        seed = opts.seed + 7919 * step
        parts = self._acquisition_parts(models, store, eta)
        available = _memoized(available)  # one cache lookup per key and step
        store = self._with_reserved(store, reserved, step)
        stale = self.stale_prefixes(store) if self.strategy.memoization_aware else set()
        acqf, cached = self._acquisition(parts, store, available, stale)

        pool = self._prefix_pool(store, available, stale)
        try:
            ranked = self._rank_pool(acqf, pool, seed, q)
        except AcquisitionError as exc:
            # Objectives or costs of extreme magnitude (|y| ~ 1e154 and beyond
            # overflow the GP's standardization): no point is better than another.
            warnings.warn(
                f"BO step {step}: {exc}; proposing a random point instead",
                AcquisitionWarning,
                stacklevel=2,
            )
            x = self._random.propose(10_000 + step)
            return [self._proposal(store, None, x, cached, eta, step)]
        # The best candidate whose config no trial has had: re-running an
        # evaluated config (an acquisition maximum on a boundary of the cube,
        # say) would spend budget to learn nothing new.
        snapped = self.space.snap(torch.stack([c.x for c in ranked]))
        repeat = self._is_repeat(snapped, store)
        fresh = [i for i, r in enumerate(repeat.tolist()) if not r]
        first = self._first_fresh(ranked, fresh, step)
        x = first.x if first is not None else self._random.propose(10_000 + step)
        proposals = [self._proposal(store, first, x, cached, eta, step)]
        if q == 1 or not fresh:
            return proposals

        taken = repeat.clone()
        taken[fresh[0]] = True
        self._extend_batch(
            proposals, ranked, snapped, taken, store, parts, available, stale, q, step
        )
        return proposals

    def _with_reserved(
        self, store: TrialStore, reserved: Sequence[Mapping[str, Any]], step: int
    ) -> TrialStore:
        """``store``, or a snapshot of it with the ``reserved`` configs added as pending."""
        if reserved:
            store = store.snapshot()
            for i, config in enumerate(reserved):
                store.add_pending(
                    f"__reserved-{step}-{i}", _copy_config(config), self.space.to_unit(config)
                )
        return store

    def _rank_pool(
        self, acqf: CostAwareLogEI, pool: Sequence[Prefix], seed: int, q: int
    ) -> list[Candidate]:
        """The optimizer's candidates over ``pool``, best first (raw samples too for a batch)."""
        opts = self.options
        return rank_over_pool(
            acqf,
            pool,
            self._prefix_dims,
            self.space.dim,
            OptimizeOptions(
                num_restarts=opts.num_restarts,
                raw_samples=opts.raw_samples,
                maxiter=opts.maxiter,
            ),
            seed=seed,
            keep_raw=_BATCH_RAW_CANDIDATES if q > 1 else 0,
        )

    def _first_fresh(
        self, ranked: Sequence[Candidate], fresh: Sequence[int], step: int
    ) -> Candidate | None:
        """The best candidate of an untried config (``fresh``: their indices), or
        ``None`` (logged) when every candidate repeats a tried config."""
        if fresh:
            return ranked[fresh[0]]
        logger.info(
            "BO step %d: every optimized candidate repeats a tried config; exploring a "
            "random point instead",
            step,
        )
        return None

    def _extend_batch(
        self,
        proposals: list[Proposal],
        ranked: Sequence[Candidate],
        snapped: Tensor,
        taken: Tensor,
        store: TrialStore,
        parts: _AcquisitionParts,
        available: Callable[[str], bool] | None,
        stale: Collection[PrefixId],
        q: int,
        step: int,
    ) -> None:
        """Greedy batch: append up to ``q - len(proposals)`` proposals to ``proposals``.

        The chosen points become pending, the rest of ``ranked`` (``snapped``: their
        snapped points; ``taken``: which are tried or chosen, updated) is re-scored.
        """
        work = store.snapshot()
        X_cand = torch.stack([c.x for c in ranked])
        for j in range(1, q):
            chosen = proposals[-1]
            work.add_pending(
                f"__batch-{step}-{j}", chosen.config, self.space.to_unit(chosen.config)
            )
            taken |= (
                (snapped - self.space.snap(self.space.to_unit(chosen.config))).abs() <= 1e-9
            ).all(-1)
            if bool(taken.all()):
                break
            acqf_j, cached_j = self._acquisition(parts, work, available, stale)
            with torch.no_grad():
                values = acqf_j(X_cand.unsqueeze(-2))
            values = torch.where(
                taken | ~torch.isfinite(values), torch.full_like(values, -math.inf), values
            )
            best = int(values.argmax())
            if not math.isfinite(float(values[best])):
                break
            taken[best] = True
            candidate = replace(ranked[best], value=float(values[best]))
            proposals.append(
                self._proposal(work, candidate, candidate.x, cached_j, parts.eta, step)
            )

    def _acquisition_parts(
        self, models: SurrogateModels, store: TrialStore, eta: float
    ) -> _AcquisitionParts:
        """What one BO step's acquisitions share, however many pending points they see."""
        return _AcquisitionParts(models, eta, self.strategy.cost_models(models))

    def _acquisition(
        self,
        parts: _AcquisitionParts,
        store: TrialStore,
        available: Callable[[str], bool] | None,
        stale: Collection[PrefixId] = (),
    ) -> tuple[CostAwareLogEI, CachedPrefixes | None]:
        """The acquisition given the pending trials of ``store``, and its cached
        prefixes. Stale prefixes (:meth:`stale_prefixes`) are priced as uncached;
        the prefixes returned are all that can be loaded (the planned depth)."""
        pending = store.pending
        X_pending = torch.stack([r.x for r in pending]) if pending else None
        objective = MarginalGP(parts.models.objective, X_pending)  # kriging believer
        best_f = parts.models.best_f
        if objective.believed_max is not None:  # the believer's incumbent
            best_f = max(best_f, objective.believed_max)
        strategy = self.strategy
        cached = self._cached_prefixes(store, available) if strategy.memoization_aware else None
        priced = self._cached_prefixes(store, available, stale) if stale else cached
        acqf = strategy.build(
            AcquisitionInputs(
                objective=objective,
                best_f=best_f,
                costs=parts.costs,
                cached=priced,
                eta=parts.eta,
                mc_samples=self.options.mc_samples,
                cost_overhead=self.options.cost_overhead,
            )
        )
        return acqf, cached

    def _proposal(
        self,
        store: TrialStore,
        candidate: Candidate | None,
        x: Tensor,
        cached: CachedPrefixes | None,
        eta: float,
        step: int,
    ) -> Proposal:
        """The config of cube point ``x`` (the candidate's, or a random point)."""
        config = self.space.from_unit(x)
        prefix = candidate.prefix if candidate is not None else Prefix(depth=0)
        if prefix.depth > 0 and prefix.source_trial is not None:
            # Copy the prefix's stages verbatim: a float re-decoded from the cube may
            # differ in the last bit, and then its prefix key would not match.
            source = store[prefix.source_trial].config
            for name in self.space.stage_names[: prefix.depth]:  # nested: K > 1
                config[name] = dict(source[name])
        depth = prefix.depth
        if cached:
            depth = max(depth, int(cached.depth(x.reshape(1, 1, -1)).item()))
        logger.debug(
            "BO step %d: prefix depth %d (trial %s), acq %.4g, eta %.3f",
            step,
            depth,
            prefix.source_trial,
            candidate.value if candidate is not None else math.nan,
            eta,
        )
        return Proposal(
            config,
            depth,
            prefix.source_trial,
            store.version,
            eta=eta,
            acquisition_value=candidate.value if candidate is not None else None,
        )

    def _cached_prefixes(
        self,
        store: TrialStore,
        available: Callable[[str], bool] | None,
        exclude: Collection[PrefixId] = (),
    ) -> CachedPrefixes:
        points: dict[int, list[Tensor]] = {}
        for record in store:
            for depth in range(1, self.space.n_stages):
                key = record.prefix_keys[depth - 1] if len(record.prefix_keys) >= depth else None
                if exclude and prefix_ident(record.x, self._prefix_dims[depth], depth) in exclude:
                    continue
                if _prefix_available(record, depth, key, available):
                    points.setdefault(depth, []).append(record.x[self._prefix_dims[depth]])
        stacked = {k: torch.stack(v) for k, v in points.items()}
        return CachedPrefixes(stacked, self._prefix_dims, snap=self.space.snap)


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _check_int(options: EngineOptions, name: str, minimum: int) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EngineOptionsError(f"{name}={value!r} must be an int >= {minimum}")


def _check_nonnegative(options: EngineOptions, name: str) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise EngineOptionsError(f"{name}={value!r} must be a finite number >= 0")


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy_config(config: Mapping[str, Any]) -> dict[str, Any]:
    # Copies the dicts, not the values: a choice comes back as the very object of
    # the space (a class, a function), and the record is safe from the caller.
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _as_predicate(available: AvailablePrefixes) -> Callable[[str], bool] | None:
    if available is None or callable(available):
        return available  # type: ignore[return-value]
    keys = available
    return lambda key: key in keys


def _memoized(available: Callable[[str], bool] | None) -> Callable[[str], bool] | None:
    """``available`` asked once per key: a step asks about every record's
    prefixes, once per candidate of a batch, and each answer may be a cache
    lookup (a file stat, an S3 HEAD)."""
    if available is None:
        return None
    answers: dict[str, bool] = {}

    def lookup(key: str) -> bool:
        if key not in answers:
            answers[key] = bool(available(key))
        return answers[key]

    return lookup


def _prefix_available(
    record: TrialRecord, depth: int, key: str | None, available: Callable[[str], bool] | None
) -> bool:
    """Whether the prefix of ``depth`` stages of ``record`` can be loaded.

    Pending trials are producing their prefixes ("about to be cached"). A finished
    trial's prefix counts when the caller says its key is available; with no
    predicate, when the trial ran at least that far (completed, or failed with
    that stage's cost reported).
    """
    if record.status is TrialStatus.PENDING:
        return True
    if available is None:
        if record.status is TrialStatus.COMPLETED:
            return True
        costs = record.compute_costs
        return len(costs) >= depth and all(c is not None for c in costs[:depth])
    if key is None:
        return False
    return bool(available(key))
