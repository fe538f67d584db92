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
)
from eeipu_ray.search.decisions import Decision, Proposal
from eeipu_ray.search.errors import (
    AcquisitionError,
    AcquisitionWarning,
    EngineStateError,
    TrialStateError,
)
from eeipu_ray.search.models import (
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
from eeipu_ray.search.options import EngineOptions
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
            with torch_threads(opts.num_threads):
                x = self._next_warmup_point()
            phase = "warmup"
            config = self.space.from_unit(x)
        else:
            self._enter_bo()
            proposal = lookahead if self._usable(lookahead) else None
            if proposal is None:
                with torch_threads(opts.num_threads):
                    proposal = self._propose(self.store, available, self.bo_steps)
            config = copy_config(proposal.config)
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
        return copy_config(config)

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
            with torch_threads(threads):
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
        self.store.add_pending(trial_id, copy_config(config), x, phase="given", prefix_keys=keys)
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
        self.store.add_pending(trial_id, copy_config(config), x, phase="observed")
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

    def _next_warmup_point(self) -> Tensor:
        # Scrambled Sobol: diverse by construction and reproducible from
        # (seed, index), so a restored engine continues the same design.
        x = self.space.sobol(1, seed=self.options.seed, skip=self._n_warmup_drawn)[0]
        self._n_warmup_drawn += 1
        return x

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
                need_total_cost=strategy.needs_total_cost,
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
                    f"__reserved-{step}-{i}", copy_config(config), self.space.to_unit(config)
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
# Helpers
# --------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, restored after (``None``: as is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config's (nested) dicts, not of its values."""
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
