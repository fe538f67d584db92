"""The EEIPU paper's multi-stage BO baselines, MS_BO and LaMBO, as Ray Tune searchers.

They exist for side-by-side comparisons only (``benchmarks/compare.py``), so
they live here and not in the ``eeipu_ray`` package. Both run on exactly the
models EEIPU and EI use, so a comparison measures the search strategy and not
the plumbing:

* encoding: :class:`~eeipu_ray.search.SearchSpace` (declared bounds, grids and
  categoricals snapped to their cells, constants filled in on decoding);
* records: :class:`~eeipu_ray.search.TrialStore` (results parsed once, the
  direction flipped once, NaN / inf / missing metric / errors are failures);
* objective GP: :func:`~eeipu_ray.search.fit_surrogates` with a
  :class:`~eeipu_ray.search.GPFitter` (Matern-5/2 ARD, categorical kernel,
  warm-started fits), conditioned on pending trials (kriging believer);
* acquisition: log-EI (:class:`~eeipu_ray.search.CostAwareLogEI` with
  ``eta = 0``), maximized with :func:`~eeipu_ray.search.optimize.rank_over_pool`
  (Sobol raw samples + batched L-BFGS-B restarts) inside a box;
* warm-up: the engine's scrambled Sobol design, point for point: the first
  ``n_warmup`` configs equal those of ``EEIPUSearcher(acquisition="ei")``
  with the same seed.

Neither searcher knows a budget: they propose configs until Tune stops
asking (the harness wraps them in a budget-enforcing ``Searcher``).

Example:
    >>> from baselines import LaMBOSearcher
    >>> searcher = LaMBOSearcher(pipeline, metric="score", mode="max", seed=0)
    >>> tune.Tuner(pipeline.as_trainable(cache=cache, metric="score"),
    ...            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=50,
    ...                                        reuse_actors=True)).fit()
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from botorch.acquisition import AcquisitionFunction
from ray.tune.search import Searcher
from torch import Tensor

from eeipu_ray.errors import EEIPUError
from eeipu_ray.search.acquisition import CostAwareLogEI

# The engine's helpers: one torch thread for the small GPs; configs copied per stage.
from eeipu_ray.search.engine import copy_config, torch_threads
from eeipu_ray.search.errors import TrialStateError
from eeipu_ray.search.models import GPFitter, MarginalGP, fit_surrogates
from eeipu_ray.search.optimize import EMPTY_PREFIX, OptimizeOptions, Prefix, rank_over_pool
from eeipu_ray.search.records import TrialRecord, TrialStore
from eeipu_ray.search.space import Dimension, SearchSpace

if TYPE_CHECKING:
    from botorch.models import SingleTaskGP

    from eeipu_ray.pipeline import Pipeline

__all__ = ["BaselineStateError", "LaMBOSearcher", "LaMBOStep", "MSBOSearcher"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_MIN_OBSERVATIONS = 2  # completed trials before the GP is trusted (as the engine)
_RANDOM_TRIES = 64  # random draws tried before a repeated config is accepted
_LOSS_SAMPLES = 256  # Sobol points that estimate a leaf's best UCB
_UCB_BETA = 0.2  # UCB = mean + sqrt(beta) * std (BoTorch's convention)


class BaselineStateError(EEIPUError, RuntimeError):
    """A baseline searcher was used without metric/mode, or given a checkpoint
    of another searcher, format or search space."""


class _MultiStageBO(Searcher):
    """What MS_BO and LaMBO share: records, warm-up, objective GP, EI in a box,
    no repeated configs, checkpoints. Subclasses implement :meth:`_bo_step`."""

    def __init__(
        self,
        pipeline: Pipeline,
        metric: str | None = None,
        mode: str | None = None,
        n_warmup: int = 10,
        seed: int = 0,
        num_restarts: int = 10,
        raw_samples: int = 512,
    ) -> None:
        if mode is not None and mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
        for name, value, minimum in (
            ("n_warmup", n_warmup, 1),
            ("seed", seed, 0),
            ("num_restarts", num_restarts, 1),
            ("raw_samples", raw_samples, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
        super().__init__(metric=metric, mode=mode)
        self.space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
        self.n_warmup = n_warmup
        self.seed = seed
        self.optimize_options = OptimizeOptions(num_restarts=num_restarts, raw_samples=raw_samples)
        self._store: TrialStore | None = None
        self._n_suggested = 0
        self._n_warmup_drawn = 0
        self._bo_steps = 0
        self._fitter = GPFitter([d.n if d.kind == "categorical" else 0 for d in self.space.dims])
        self._model: SingleTaskGP | None = None
        self._model_version = -1
        self._stage_dims = [self.space.dims_of_stage(k) for k in range(self.space.n_stages)]
        self._prefix_dims = [self.space.dims_of_prefix(k) for k in range(self.space.n_stages + 1)]

    # ------------------------------------------------------------ Tune API
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        """Take metric and mode from ``TuneConfig`` when not given to the constructor.

        The search space always comes from the pipeline; ``config`` is ignored.
        """
        if metric and self._metric is None:
            self._metric = metric
        if mode and self._mode is None:
            if mode not in ("max", "min"):
                raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any]:
        """The next config (nested ``{stage: {key: value}}``, constants filled in)."""
        store = self.store
        if trial_id in store:
            raise TrialStateError(
                f"trial id {trial_id!r} was already suggested; trial ids must be unique"
            )
        if self._next_is_bo():
            with torch_threads(1):
                x, kept_from = self._bo_step(trial_id, self._bo_steps)
            phase = "bo"
            self._bo_steps += 1
        else:
            # The engine's Sobol warm-up, drawn the same way (seed, index).
            x = self.space.sobol(1, seed=self.seed, skip=self._n_warmup_drawn)[0]
            self._n_warmup_drawn += 1
            kept_from, phase = None, "warmup"
        config = self.space.from_unit(x)
        if kept_from is not None:
            # Copy kept stages verbatim: a float re-decoded from the cube may differ
            # in the last bit, and then its prefix key would miss the cached entry.
            source_trial, depth = kept_from
            source = store[source_trial].config
            for name in self.space.stage_names[:depth]:
                config[name] = dict(source[name])
        store.add_pending(trial_id, copy_config(config), self.space.to_unit(config), phase=phase)
        self._n_suggested += 1
        return copy_config(config)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Intermediate results are not used."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Record a final result (idempotent). A NaN / infinite / missing metric or
        ``error`` marks the trial failed: it is kept (no repeat) but not fitted."""
        store = self.store
        if trial_id not in store:
            logger.warning("%s: result for unknown trial %s ignored", type(self).__name__, trial_id)
            return
        store.complete(trial_id, result, error=error)

    # ------------------------------------------------------------- access
    @property
    def store(self) -> TrialStore:
        """The trial records (created once metric and mode are known)."""
        if self._store is None:
            if self._metric is None or self._mode is None:
                raise BaselineStateError(
                    f"{type(self).__name__} needs metric and mode: pass them to the searcher "
                    "or to tune.TuneConfig(metric=..., mode=...)"
                )
            self._store = TrialStore(self.space.stage_names, metric=self._metric, mode=self._mode)
        return self._store

    @property
    def records(self) -> list[TrialRecord]:
        """All trial records, in suggestion order (``phase`` is "warmup" or "bo")."""
        return list(self._store) if self._store is not None else []

    # ------------------------------------------------------- checkpointing
    def save(self, checkpoint_path: str) -> None:
        """Write the state atomically (temporary file, then ``os.replace``)."""
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        tmp = os.path.join(directory, f".{os.path.basename(checkpoint_path)}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                pickle.dump(self._state(), fh, protocol=5)
            os.replace(tmp, checkpoint_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def restore(self, checkpoint_path: str) -> None:
        """Load a :meth:`save` file of the same searcher class on the same space."""
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise BaselineStateError(
                f"{checkpoint_path!r} is not a baseline-searcher checkpoint of format "
                f"{CHECKPOINT_FORMAT}"
            )
        if state.get("searcher") != type(self).__name__:
            raise BaselineStateError(
                f"{checkpoint_path!r} was written by {state.get('searcher')}, not "
                f"{type(self).__name__}"
            )
        if list(state.get("space", [])) != self.space.signature():
            raise BaselineStateError(
                f"{checkpoint_path!r} was written for another search space; restore it into "
                "a searcher built on the same pipeline"
            )
        self._load(state)

    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "searcher": type(self).__name__,
            "space": self.space.signature(),
            "metric": self._metric,
            "mode": self._mode,
            "n_suggested": self._n_suggested,
            "n_warmup_drawn": self._n_warmup_drawn,
            "bo_steps": self._bo_steps,
            "records": [r.to_dict() for r in self._store] if self._store is not None else [],
            "gp": self._fitter.state_dict(),
            "algorithm": self._algorithm_state(),
        }

    def _load(self, state: Mapping[str, Any]) -> None:
        self._metric = self._metric or state.get("metric")
        self._mode = self._mode or state.get("mode")
        self._store = None
        store = self.store
        for data in state["records"]:
            store.add_record(TrialRecord.from_dict(data))
        self._n_suggested = int(state["n_suggested"])
        self._n_warmup_drawn = int(state["n_warmup_drawn"])
        self._bo_steps = int(state["bo_steps"])
        self._fitter.load_state_dict(state.get("gp", {}))
        self._model, self._model_version = None, -1
        self._load_algorithm_state(state.get("algorithm", {}))

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles the searcher: ship no fitted GP (it is rebuilt from the
        # records and the fitter's warm-start state).
        state = self.__dict__.copy()
        state["_model"], state["_model_version"] = None, -1
        return state

    def _algorithm_state(self) -> dict[str, Any]:
        return {}

    def _load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------ BO parts
    def _bo_step(self, trial_id: str, step: int) -> tuple[Tensor, tuple[str, int] | None]:
        """``(x [d], kept)``: the point of BO step ``step``, and optionally
        ``(source_trial, depth)``: stages ``< depth`` are copied from that trial."""
        raise NotImplementedError

    def _next_is_bo(self) -> bool:
        # The engine's rule: the first n_warmup suggestions are warm-up, and BO waits
        # for two completed trials.
        return (
            self._n_suggested >= self.n_warmup
            and len(self.store.completed) >= _MIN_OBSERVATIONS
            and self.space.dim > 0
        )

    def _objective_model(self) -> SingleTaskGP:
        """The objective GP on the completed trials, refitted when results arrived."""
        store = self.store
        if self._model is None or self._model_version != store.version:
            with torch_threads(1):
                models = fit_surrogates(
                    self._fitter,
                    list(store),
                    self._stage_dims,
                    need_stage_costs=False,
                    need_total_cost=False,
                )
            self._model, self._model_version = models.objective, store.version
        return self._model

    def log_ei(self) -> CostAwareLogEI:
        """Log-EI on the current records, as the engine's EI computes it: pending
        trials are believed at their posterior mean (kriging believer).

        Needs at least one completed trial.
        """
        store = self.store
        pending = store.pending
        X_pending = torch.stack([r.x for r in pending]) if pending else None
        objective = MarginalGP(self._objective_model(), X_pending)
        best_f = max(float(r.objective) for r in store.completed)  # type: ignore[arg-type]
        return CostAwareLogEI(objective, best_f, cost=None, eta=0.0)

    def _maximize(
        self, acqf: AcquisitionFunction, lower: Tensor, upper: Tensor, fixed_depth: int, seed: int
    ) -> list[Tensor]:
        """Candidates (``Tensor[d]`` each, best first) maximizing ``acqf`` over the box
        ``[lower, upper]``; dimensions with ``lower == upper`` are fixed there.

        ``fixed_depth`` says that the stages before it are fixed, so the raw
        samples and restarts are shared out over the free dimensions only.
        """
        width = upper - lower
        if not bool((width > 0).any()):
            return [lower.clone()]
        boxed = _BoxAcquisition(acqf, lower, width)
        pool = [
            Prefix(depth=fixed_depth, x=torch.full_like(lower, 0.5))
            if fixed_depth > 0
            else EMPTY_PREFIX
        ]
        ranked = rank_over_pool(
            boxed, pool, self._prefix_dims, self.space.dim, self.optimize_options, seed=seed
        )
        return [lower + c.x * width for c in ranked]

    def _pick(
        self, candidates: Sequence[Tensor], lower: Tensor, upper: Tensor, generator: torch.Generator
    ) -> Tensor:
        """The first candidate that no trial has tried; else a fresh random point of
        the box; else a fresh random point anywhere (snapped, ``Tensor[d]``)."""
        if candidates:
            snapped = self.space.snap(torch.stack(list(candidates)))
            repeat = self._is_repeat(snapped).tolist()
            for x, r in zip(snapped, repeat, strict=True):
                if not r:
                    return x
        zeros, ones = torch.zeros_like(lower), torch.ones_like(lower)
        for where, box_lower, box_width in (("box", lower, upper - lower), ("space", zeros, ones)):
            uniform = torch.rand(
                _RANDOM_TRIES, self.space.dim, generator=generator, dtype=torch.double
            )
            draws = self.space.snap(box_lower + box_width * uniform)
            fresh = (~self._is_repeat(draws)).nonzero()
            if fresh.numel():
                logger.info(
                    "%s: every optimized candidate repeats a tried config; a random point of "
                    "the %s instead",
                    type(self).__name__,
                    where,
                )
                return draws[int(fresh[0])]
        logger.warning("%s: no untried config found; repeating one", type(self).__name__)
        return self.space.snap(lower.unsqueeze(0))[0]

    def _is_repeat(self, X: Tensor) -> Tensor:
        """``BoolTensor[m]``: whether each snapped row of ``X`` is a tried config."""
        records = list(self.store)
        if not records:
            return torch.zeros(X.shape[0], dtype=torch.bool)
        seen = self.space.snap(torch.stack([r.x for r in records]))
        return ((X.unsqueeze(-2) - seen).abs() <= 1e-9).all(-1).any(-1)

    def _generator(self, step: int, salt: int) -> torch.Generator:
        """A generator that depends only on ``(seed, step, salt)``: a restored
        searcher draws what the original would have."""
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63)
        )

    def _step_seed(self, step: int) -> int:
        return self.seed + 7919 * step  # the engine's optimizer seed for BO step `step`


class MSBOSearcher(_MultiStageBO):
    r"""MS_BO, as the EEIPU paper describes the baseline: random upstream stages,
    EI on the last stage.

    Each BO step draws the hyperparameters of stages ``1..K-1`` uniformly at
    random (uniform in the unit cube of the shared encoding: uniform values,
    log-uniform for log domains, every grid value / category equally likely),
    then maximizes log-EI over the last stage's hyperparameters with the
    upstream dimensions fixed to that draw. The objective GP is fitted on the
    full config (all stages) from every completed trial. With one stage, MS_BO
    is plain EI.

    Warm-up: the engine's Sobol design (identical to EI's for the same seed).
    A BO step whose EI optimum repeats a tried config takes the next-best
    restart, else a random last stage with the same upstream draw, else a
    random config. The upstream draw of BO step ``t`` depends only on
    ``(seed, t)``, so runs are reproducible and a restored searcher continues
    the same sequence.

    Args:
        pipeline: The pipeline (its nested ``search_space`` and ``stage_names``).
        metric: The metric to optimize (or set by ``TuneConfig``).
        mode: ``"max"`` or ``"min"`` (or set by ``TuneConfig``).
        n_warmup: Sobol points before BO starts.
        seed: Seeds the warm-up design, the upstream draws and the optimizer.
        num_restarts: L-BFGS-B restarts (shared out over the free dimensions).
        raw_samples: Sobol raw samples for the restarts.

    Example:
        >>> searcher = MSBOSearcher(pipeline, metric="score", mode="max", seed=3)
        >>> config = searcher.suggest("t0")
        >>> searcher.on_trial_complete("t0", {"score": 1.0})
    """

    def upstream_draw(self, step: int) -> Tensor:
        """``Tensor[d]``: BO step ``step``'s uniform draw (only the dimensions of
        stages ``1..K-1`` are used), snapped to grid cells."""
        gen = self._generator(step, salt=1)
        return self.space.snap(torch.rand(1, self.space.dim, generator=gen, dtype=torch.double))[0]

    def _bo_step(self, trial_id: str, step: int) -> tuple[Tensor, tuple[str, int] | None]:
        depth = self.space.n_stages - 1
        upstream = self._prefix_dims[depth]
        draw = self.upstream_draw(step)
        lower = torch.zeros(self.space.dim, dtype=torch.double)
        upper = torch.ones(self.space.dim, dtype=torch.double)
        lower[upstream] = upper[upstream] = draw[upstream]
        candidates = self._maximize(self.log_ei(), lower, upper, depth, self._step_seed(step))
        x = self._pick(candidates, lower, upper, self._generator(step, salt=2))
        return x, None


@dataclass(frozen=True)
class LaMBOStep:
    """One LaMBO BO step, for analysis and tests.

    Attributes:
        trial_id: The trial it proposed.
        arm: The leaf (arm) it ran in, ``0 .. 2^H - 1``.
        kept_stages: Leading stages copied verbatim from an earlier trial
            (``K - 1`` when the arm stayed: only the last stage is new).
        switched: Whether the arm differs from the previous step's (the first
            step counts as a switch).
        loss: The bandit loss of the arm, in ``[0, 1]``.
        source_trial: The trial whose first ``kept_stages`` stages were copied
            (``None`` when nothing was kept).
    """

    trial_id: str
    arm: int
    kept_stages: int
    switched: bool
    loss: float
    source_trial: str | None = None


class LaMBOSearcher(_MultiStageBO):
    r"""LaMBO (Lin, Miano & Dyer, UAI 2021, "Bayesian Optimization for Modular
    Black-Box Systems with Switching Costs"), adapted to memoized pipelines.

    What this class does, exactly:

    1. **Tree of upstream boxes.** The cube of stages ``1..K-1`` is cut by a
       complete binary tree of depth ``H``: stage 1's ``depth_per_stage``
       levels at the top, then stage 2's, and so on (earlier stages near the
       root: changing them is the expensive move). Each level halves one
       dimension of its stage (round-robin over the stage's dimensions); a
       grid or categorical dimension is cut on a cell boundary, at most
       ``floor(log2 n)`` times, so snapped values never straddle two leaves.
       The ``2^H`` leaves are the arms; the last stage is never partitioned.
    2. **Lazy arm choice: the Slowly Moving Bandit** (Koren, Livni & Mansour,
       NeurIPS 2017), which LaMBO uses. Distribution ``p`` over arms, start
       uniform. Step ``t`` draws its arm from ``p`` restricted to the subtree
       of height ``h_{t-1}`` that holds the previous arm; then draws
       ``sigma_t`` uniformly from ``{-1, +1}^H``, sets
       ``h_t = min{h : sigma_{t,h} = -1}`` (``H`` if none), and updates
       ``p(i) <- p(i) exp(-eta l~(i))`` (normalized) with the SMB estimator
       ``l~ = l_0 + sum_{h<H} sigma_h l_h``, ``l_0(i) = [i = i_t] loss / p(i_t)``,
       ``l_h(i) = -(1/eta) log(sum_{j in A_h(i)} p(j) exp(-eta (1 + sigma_{h-1})
       l_{h-1}(j)) / p(A_h(i)))``, skipped when ``p(A_h(i_t)) < 2^h eta`` for
       some ``h < H`` (SMB's guard). After half of the steps
       (``sigma_0 = -1``) the next arm is the same; a move across a level-``h``
       node has probability about ``2^-h``.
    3. **Arm loss from the GP.** ``loss = clip((y* - v) / (y* - y_min), 0, 1)``
       where ``v`` is the best UCB (``mean + sqrt(0.2) std``) of the objective
       GP over 256 Sobol points of the arm's leaf plus the proposed point,
       and ``y*`` / ``y_min`` are the best / worst objective observed: a leaf
       whose optimistic value reaches the incumbent costs nothing, a leaf that
       looks no better than the worst trial costs 1.
    4. **BO inside the arm, memoization-aware.** The objective GP (all data,
       full config) and log-EI, as EI. If the arm stayed, the upstream stages
       ``1..K-1`` are copied verbatim from an earlier trial, so the trial
       loads that prefix from the cache, and EI is maximized over the last
       stage only. If the arm switched, the stages above the highest tree
       level that changed are kept the same way (their boxes did not change,
       so a shorter cached prefix still applies) and EI is maximized over the
       remaining stages, the upstream ones restricted to the new leaf's box.
       The kept stages come from the best completed trial whose kept stages
       lie in the arm's boxes (the arm's incumbent prefix), or, when there is
       none, from the previous BO trial (which lies in them by construction).
       The first BO step optimizes the full config inside its arm. Repeats
       fall back to the next-best restart, then a random point of the same
       region, then a random config.

    Departures. We checked the paper's abstract and a public implementation
    of the LaMBO baseline that appears to come from the EEIPU authors' code
    (package ``cost_aware_bo``; "the reference" below), not the paper's full
    algorithm box, so details of the paper itself may differ:

    * Inside the arm we maximize EI (the acquisition every baseline here
      uses); the reference maximizes GP-UCB (``beta = 0.2``). UCB appears
      here only in the arm loss.
    * One GP on all trials, over the full config, and the shared global Sobol
      warm-up; the reference keeps one data set per leaf, each with its own
      initial points.
    * The loss is computed from the GP when the step is proposed (available at
      once, also under asynchronous completion) and normalized to ``[0, 1]``
      as SMB assumes; the reference feeds the leaf's raw UCB maximum as the
      loss (a higher UCB then counts as a larger loss). Our sign makes a leaf
      with a higher optimistic value a lower loss.
    * No switching-cost model: the cost of moving is what the harness
      measures (a stayed arm loads its cached prefix, the rest is
      recomputed). In the reference every step optimizes all variables
      within the leaf; here staying freezes the upstream ones (that is what
      makes the prefix cache hit) and they change only when the arm moves.
    * The tree is fixed: the reference also drops an arm's half of the space
      when the arm's probability falls below ``0.1 / n_arms``.
    * Tree shape: the reference cuts each upstream stage once (``2^(K-1)``
      arms, our default ``depth_per_stage=1``), but its two "halves" appear
      to be the lower and the upper half of every dimension of the stage at
      once; ours halve one dimension per level and tile the box.

    Args:
        pipeline: The pipeline (its nested ``search_space`` and ``stage_names``).
        metric: The metric to optimize (or set by ``TuneConfig``).
        mode: ``"max"`` or ``"min"`` (or set by ``TuneConfig``).
        n_warmup: Sobol points before BO starts.
        seed: Seeds the warm-up, the bandit and the optimizer.
        num_restarts: L-BFGS-B restarts (shared out over the free dimensions).
        raw_samples: Sobol raw samples for the restarts.
        eta: The bandit's learning rate.
        depth_per_stage: Tree levels per upstream stage (``H = sum`` of them,
            fewer for a stage whose dimensions cannot be cut that often).

    Example:
        >>> searcher = LaMBOSearcher(pipeline, metric="score", mode="max", seed=0)
        >>> config = searcher.suggest("t0")
        >>> searcher.on_trial_complete("t0", {"score": 1.0})
        >>> searcher.n_arms
        4
    """

    def __init__(
        self,
        pipeline: Pipeline,
        metric: str | None = None,
        mode: str | None = None,
        n_warmup: int = 10,
        seed: int = 0,
        num_restarts: int = 10,
        raw_samples: int = 512,
        *,
        eta: float = 0.1,
        depth_per_stage: int = 1,
    ) -> None:
        super().__init__(pipeline, metric, mode, n_warmup, seed, num_restarts, raw_samples)
        if not (isinstance(eta, int | float) and not isinstance(eta, bool) and 0 < eta < math.inf):
            raise ValueError(f"eta={eta!r} must be a number > 0")
        if (
            isinstance(depth_per_stage, bool)
            or not isinstance(depth_per_stage, int)
            or depth_per_stage < 0
        ):
            raise ValueError(f"depth_per_stage={depth_per_stage!r} must be an int >= 0")
        self.eta = float(eta)
        self.levels = _tree_levels(self.space, depth_per_stage)
        self._bandit = _SlowlyMovingBandit(len(self.levels), self.eta)
        self._anchor: str | None = None  # the previous BO trial: its stages are kept
        self._history: list[LaMBOStep] = []

    @property
    def n_arms(self) -> int:
        """Number of leaves ``2^H``."""
        return 2 ** len(self.levels)

    @property
    def arm_probabilities(self) -> Tensor:
        """``Tensor[2^H]``: the bandit's current distribution over arms."""
        return self._bandit.probs.clone()

    @property
    def history(self) -> list[LaMBOStep]:
        """One :class:`LaMBOStep` per BO step, in order."""
        return list(self._history)

    def leaf_box(self, arm: int) -> tuple[Tensor, Tensor]:
        """``(lower, upper)``, each ``Tensor[d]``: the arm's box in the cube (the last
        stage's dimensions span ``[0, 1]``)."""
        if not 0 <= arm < self.n_arms:
            raise ValueError(f"arm {arm} outside 0..{self.n_arms - 1}")
        lower = torch.zeros(self.space.dim, dtype=torch.double)
        upper = torch.ones(self.space.dim, dtype=torch.double)
        depth = len(self.levels)
        for level, (_, i) in enumerate(self.levels):
            cut = _cut(self.space.dims[i], float(lower[i]), float(upper[i]))
            if (arm >> (depth - 1 - level)) & 1:
                lower[i] = cut
            else:
                upper[i] = cut
        return lower, upper

    def _bo_step(self, trial_id: str, step: int) -> tuple[Tensor, tuple[str, int] | None]:
        gen = self._generator(step, salt=3)
        previous = self._bandit.arm
        arm = self._bandit.draw(gen)
        anchor = self.store.get(self._anchor)
        kept = 0 if previous is None or anchor is None else self._kept_stages(previous, arm)
        lower, upper = self.leaf_box(arm)
        if kept > 0:
            assert anchor is not None
            dims = self._prefix_dims[kept]
            # The kept stages come from the best completed trial in the same boxes
            # (its prefix is cached); else from the previous BO trial (still running,
            # or failed), which lies in them by construction.
            anchor = self._best_in_box(dims, lower, upper) or anchor
            lower[dims] = upper[dims] = anchor.x[dims]
        acqf = self.log_ei()
        candidates = self._maximize(acqf, lower, upper, kept, self._step_seed(step))
        x = self._pick(candidates, lower, upper, self._generator(step, salt=4))
        loss = self._arm_loss(arm, x, step)
        self._bandit.update(arm, loss, gen)
        self._history.append(
            LaMBOStep(
                trial_id,
                arm,
                kept,
                switched=previous is None or previous != arm,
                loss=loss,
                source_trial=anchor.trial_id if kept > 0 and anchor is not None else None,
            )
        )
        self._anchor = trial_id
        return x, ((anchor.trial_id, kept) if kept > 0 and anchor is not None else None)

    def _best_in_box(self, dims: list[int], lower: Tensor, upper: Tensor) -> TrialRecord | None:
        """The best completed trial whose coordinates ``dims`` lie in the box."""
        lo, hi = lower[dims] - 1e-12, upper[dims] + 1e-12
        inside = [
            r for r in self.store.completed if bool(((r.x[dims] >= lo) & (r.x[dims] <= hi)).all())
        ]
        # Ties: the earliest (max keeps the first maximum).
        return max(inside, key=lambda r: float(r.objective or 0.0), default=None)

    def _kept_stages(self, previous: int, arm: int) -> int:
        """Leading stages whose boxes agree between two arms (``K - 1`` if equal)."""
        diff = previous ^ arm
        if diff == 0:
            return self.space.n_stages - 1
        depth = len(self.levels)
        highest_changed_level = depth - diff.bit_length()  # from the root
        return self.levels[highest_changed_level][0]

    def _arm_loss(self, arm: int, x: Tensor, step: int) -> float:
        """The bandit loss of ``arm`` in ``[0, 1]`` (see the class docstring, 3)."""
        store = self.store
        ys = [float(r.objective) for r in store.completed]  # type: ignore[arg-type]
        best, worst = max(ys), min(ys)
        if not best > worst:
            return 0.0
        lower, upper = self.leaf_box(arm)
        sobol = torch.quasirandom.SobolEngine(
            self.space.dim, scramble=True, seed=self.seed + 7919 * step
        ).draw(_LOSS_SAMPLES, dtype=torch.double)
        X = self.space.snap(torch.cat([lower + sobol * (upper - lower), x.unsqueeze(0)]))
        with torch.no_grad():
            posterior = MarginalGP(self._objective_model()).posterior(X.unsqueeze(-2))
            ucb = posterior.mean + math.sqrt(_UCB_BETA) * posterior.variance.sqrt()
        value = float(ucb.max())
        return float(min(max((best - value) / (best - worst), 0.0), 1.0))

    def _algorithm_state(self) -> dict[str, Any]:
        return {
            "probs": self._bandit.probs.tolist(),
            "arm": self._bandit.arm,
            "level": self._bandit.level,
            "anchor": self._anchor,
            "history": [asdict(s) for s in self._history],
            "levels": [list(level) for level in self.levels],
            "eta": self.eta,
        }

    def _load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        if [tuple(level) for level in state.get("levels", [])] != list(self.levels):
            raise BaselineStateError(
                "checkpoint was written with another tree (depth_per_stage); restore it "
                "into a LaMBOSearcher built with the same settings"
            )
        bandit = _SlowlyMovingBandit(len(self.levels), float(state.get("eta", self.eta)))
        bandit.probs = torch.tensor(state["probs"], dtype=torch.double)
        bandit.arm = state["arm"]
        bandit.level = int(state["level"])
        self._bandit = bandit
        self._anchor = state.get("anchor")
        self._history = [LaMBOStep(**s) for s in state.get("history", [])]


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


class _SlowlyMovingBandit:
    """Koren, Livni & Mansour's Slowly Moving Bandit on the ``2^H`` leaves of a
    complete binary tree (leaf ``i``'s bits, most significant first, are its path
    from the root). ``A_h(i)``, the leaves of the height-``h`` subtree holding
    ``i``, are the leaves sharing ``i``'s top ``H - h`` bits: a contiguous block.

    Args:
        depth: ``H``.
        eta: Learning rate.
    """

    def __init__(self, depth: int, eta: float) -> None:
        self.depth = depth
        self.eta = eta
        self.probs = torch.full((2**depth,), 1.0 / 2**depth, dtype=torch.double)
        self.arm: int | None = None
        self.level = depth  # h_{t-1}: the next arm stays in this subtree of the last one

    def draw(self, generator: torch.Generator) -> int:
        """The next arm: ``p`` restricted to ``A_{h_{t-1}}(i_{t-1})``."""
        if self.arm is None:
            lo, hi = 0, self.probs.numel()
        else:
            lo = (self.arm >> self.level) << self.level
            hi = lo + 2**self.level
        block = self.probs[lo:hi]
        return lo + int(torch.multinomial(block / block.sum(), 1, generator=generator))

    def update(self, arm: int, loss: float, generator: torch.Generator) -> None:
        """Feed the played arm's loss (in ``[0, 1]``); draw ``sigma`` and ``h_t``."""
        H, eta, p = self.depth, self.eta, self.probs
        sigma = torch.randint(0, 2, (H,), generator=generator, dtype=torch.long) * 2 - 1
        negative = (sigma < 0).nonzero()
        self.arm = arm
        self.level = int(negative[0]) if negative.numel() else H
        if H == 0 or _guarded(p, arm, eta):
            return
        log_p = torch.log(p.clamp_min(1e-300))
        terms = [torch.zeros_like(p)]
        terms[0][arm] = loss / float(p[arm])
        for h in range(1, H):
            size = 2**h  # |A_h(i)|
            weighted = log_p - eta * (1 + float(sigma[h - 1])) * terms[h - 1]
            num = torch.logsumexp(weighted.view(-1, size), -1)
            den = torch.logsumexp(log_p.view(-1, size), -1)
            terms.append((-(num - den) / eta).repeat_interleave(size))
        estimate = terms[0] + sum(float(sigma[h]) * terms[h] for h in range(H))
        log_new = log_p - eta * estimate
        self.probs = torch.softmax(log_new, 0)


def _guarded(p: Tensor, arm: int, eta: float) -> bool:
    """SMB's guard: skip the update when ``p(A_h(arm)) < 2^h eta`` for some ``h < H``."""
    H = int(math.log2(p.numel()))
    for h in range(H):
        lo = (arm >> h) << h
        if float(p[lo : lo + 2**h].sum()) < 2**h * eta:
            return True
    return False


def _tree_levels(space: SearchSpace, depth_per_stage: int) -> tuple[tuple[int, int], ...]:
    """``(stage, dim)`` per tree level, root first: ``depth_per_stage`` levels per
    upstream stage, round-robin over the stage's dimensions that can still be cut."""
    levels: list[tuple[int, int]] = []
    for k in range(space.n_stages - 1):
        capacity = {i: _cut_capacity(space.dims[i]) for i in space.dims_of_stage(k)}
        order = [i for i in space.dims_of_stage(k) if capacity[i] > 0]
        placed = 0
        while placed < depth_per_stage and order:
            for i in list(order):
                if placed == depth_per_stage:
                    break
                levels.append((k, i))
                capacity[i] -= 1
                placed += 1
                if capacity[i] <= 0:
                    order.remove(i)
    return tuple(levels)


def _cut_capacity(dim: Dimension) -> float:
    """How often a dimension can be halved with both halves non-empty."""
    edges = _cell_edges(dim)
    if edges is None:
        return math.inf if dim.t_upper > dim.t_lower else 0
    return math.floor(math.log2(len(edges) - 1)) if len(edges) > 2 else 0


def _cell_edges(dim: Dimension) -> list[float] | None:
    """Cube coordinates of the cell boundaries of a grid / categorical dimension
    (``n + 1`` of them, ``0`` to ``1``), ``None`` for a continuous one."""
    if dim.kind == "categorical" or (dim.is_grid and not dim.log):
        n = max(dim.n, 1)
        return [j / n for j in range(n + 1)]
    if dim.is_grid:  # log grid: boundaries halfway between values (SearchSpace.snap's rounding)
        assert dim.q is not None
        width = dim.t_upper - dim.t_lower
        inner = [
            (math.log((dim.k0 + j + 0.5) * dim.q) - dim.t_lower) / width for j in range(dim.n - 1)
        ]
        return [0.0, *inner, 1.0]
    return None


def _cut(dim: Dimension, lower: float, upper: float) -> float:
    """Where to halve ``[lower, upper]`` along ``dim``: the midpoint, or the
    middle cell boundary for grids and categoricals."""
    edges = _cell_edges(dim)
    if edges is None:
        return 0.5 * (lower + upper)
    i0 = min(range(len(edges)), key=lambda j: abs(edges[j] - lower))
    i1 = min(range(len(edges)), key=lambda j: abs(edges[j] - upper))
    return edges[(i0 + i1) // 2]


class _BoxAcquisition(AcquisitionFunction):
    """``acqf(lower + U * width)`` for ``U`` in the unit cube: maximizing it over
    ``[0, 1]^d`` maximizes ``acqf`` over the box (``width = 0`` fixes a dimension).

    Args:
        acqf: A ``q = 1`` acquisition on ``b x 1 x d``.
        lower: ``Tensor[d]``.
        width: ``Tensor[d]``, ``>= 0``.
    """

    def __init__(self, acqf: AcquisitionFunction, lower: Tensor, width: Tensor) -> None:
        super().__init__(model=acqf.model)
        self.acqf = acqf
        self.register_buffer("lower", lower)
        self.register_buffer("width", width)

    def forward(self, X: Tensor) -> Tensor:
        """``X``: ``b x 1 x d``; returns ``Tensor[b]``."""
        return self.acqf(self.lower.to(X) + X * self.width.to(X))
