"""The engine's options (:class:`EngineOptions`), validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from eeipu_ray.result import COSTS
from eeipu_ray.search.errors import EngineOptionsError
from eeipu_ray.search.models import KERNELS, WARPINGS
from eeipu_ray.search.strategies import get_strategy


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
        cost: What a trial's cost is, end to end: ``"time"`` (seconds of stage
            time) or ``"energy"`` (joules measured by the trials' energy
            meters). The budget and ``load_cost_prior`` are in this unit. The
            engine itself is unit-free; the Tune searcher reads each trial's
            cost from its result in this unit.
        cost_key: The result key holding a plain (non-pipeline) trainable's
            cost; ``None``: ``time_total_s``, or ``total_energy_joules`` with
            ``cost="energy"``. A pipeline's trials report per-stage costs.
        lookahead: The Tune searcher computes the next BO proposal in a
            background thread as soon as a suggestion is handed out, so a freed
            trial slot is refilled at once instead of after a full acquisition
            optimization (asynchronous BO: the proposal sees the trials running
            at that moment as pending, not the result that frees the slot).
            ``None`` (default): on when ``max_concurrent > 1``, or with no
            limit (``0``) whenever more than one trial is running; a sequential
            search (``max_concurrent=1``) stays exact.
        batch_size: Proposals one lookahead computes from one acquisition
            optimization (greedy batch: the later ones treat the earlier ones as
            pending, see :meth:`BOEngine.lookahead_batch`). ``"auto"``
            (default): as many as trial slots are expected to free up while one
            batch is computed (running trials / their median duration x the
            last batch's compute time, plus one); with few workers or long
            trials that is 1, the plain lookahead. An int fixes it.
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
    reserve_pending: bool = True
    pool_source: str = "all"
    pool_distinct: bool = False
    cooling: str = "after_warmup"
    objective_warping: str = "power"
    objective_kernel: str = "joint"
    cost_overhead: float = 0.0
    prefix_patience: int | None = None
    cost_free_every: int | None = None

    cost: str = "time"
    cost_key: str | None = None
    lookahead: bool | None = None
    batch_size: int | str = "auto"

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
        if self.cost not in COSTS:
            raise EngineOptionsError(f"cost={self.cost!r} must be one of {COSTS}")
        if self.cost_key is not None and (not isinstance(self.cost_key, str) or not self.cost_key):
            raise EngineOptionsError(
                f"cost_key={self.cost_key!r} must be a non-empty string or None"
            )
        if self.lookahead is not None and not isinstance(self.lookahead, bool):
            raise EngineOptionsError(f"lookahead={self.lookahead!r} must be a bool or None")
        if self.batch_size != "auto" and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise EngineOptionsError(
                f"batch_size={self.batch_size!r} must be 'auto' or an int >= 1"
            )


def _check_int(options: EngineOptions, name: str, minimum: int) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EngineOptionsError(f"{name}={value!r} must be an int >= {minimum}")


def _check_nonnegative(options: EngineOptions, name: str) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise EngineOptionsError(f"{name}={value!r} must be a finite number >= 0")
