"""Acquisition optimization over the prefix pool.

The pool holds the empty prefix (nothing fixed) and every proper prefix
(stages ``1..k``, ``k < K``) of the top-``Q`` observations that is still
available (cached now, or being produced by a running trial). For a prefix of
``delta`` stages, the cube dimensions of those stages are fixed to the
prefix's values and the acquisition is maximized over the rest; the best
candidate across the pool wins.

This is the reference's "one ``optimize_acqf`` per prefix with
``fixed_features``", batched: raw samples of all prefixes are scored in one
pass, and the L-BFGS-B restarts of all prefixes of one depth run as one
batched problem (BoTorch's ``gen_candidates_scipy`` with per-restart fixed
feature values), so a pool of ``1 + Q (K - 1)`` prefixes costs ``K`` optimizer
calls instead of ``1 + Q (K - 1)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.exceptions.errors import OptimizationGradientError
from botorch.exceptions.warnings import OptimizationWarning
from botorch.generation.gen import gen_candidates_scipy
from botorch.optim.initializers import initialize_q_batch
from torch import Tensor

from eeipu_ray.search.errors import AcquisitionError, AcquisitionWarning

logger = logging.getLogger(__name__)

_MIN_RESTARTS = 2  # per prefix, however few dimensions it leaves free


@dataclass(frozen=True)
class Prefix:
    """A candidate prefix: the first ``depth`` stages of an observed trial.

    Attributes:
        depth: Number of leading stages fixed (0: the empty prefix).
        x: ``Tensor[d]``, the source trial's cube point (only the prefix's
            dimensions matter); ``None`` for the empty prefix.
        source_trial: Id of the trial whose prefix this is.
        key: The prefix key (stages ``1..depth``), when known.
    """

    depth: int
    x: Tensor | None = None
    source_trial: str | None = None
    key: str | None = None


EMPTY_PREFIX = Prefix(depth=0)


@dataclass(frozen=True)
class OptimizeOptions:
    """Budget of the acquisition optimizer.

    Attributes:
        num_restarts: L-BFGS-B restarts for the empty prefix. A prefix that
            fixes some dimensions gets a share proportional to its free
            dimensions (at least 2).
        raw_samples: Sobol raw samples for the empty prefix, scored to pick the
            restarts. A prefix that fixes some dimensions gets a share
            proportional to its free dimensions (at least ``num_restarts``):
            the fixed ones need no covering.
        maxiter: L-BFGS-B iteration limit per restart. The log-acquisitions are
            smooth and the restarts start at the best raw points, so a few
            dozen iterations reach the optimum in practice.
        batch_limit: Raw samples scored per forward pass (memory bound).
    """

    num_restarts: int = 10
    raw_samples: int = 512
    maxiter: int = 50
    batch_limit: int = 4096

    def __post_init__(self) -> None:
        for name in ("num_restarts", "raw_samples", "maxiter", "batch_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"OptimizeOptions.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class Candidate:
    """The winner of one optimization: its point, its prefix and its value."""

    x: Tensor
    prefix: Prefix
    value: float


def prefix_ident(x: Tensor, dims: Sequence[int], depth: int) -> tuple[int, tuple[float, ...]]:
    """A prefix's identity: its depth and its stages' cube coordinates (rounded, so
    that two trials sharing a cached prefix have the same identity)."""
    return depth, tuple(round(float(v), 12) for v in x[list(dims)].tolist())


def build_prefix_pool(
    top: Sequence[tuple[str, Tensor, Sequence[str | None]]],
    n_stages: int,
    prefix_dims: Sequence[Sequence[int]],
    is_available: Callable[[str, int, str | None], bool],
) -> list[Prefix]:
    """The empty prefix plus the available proper prefixes of the top trials.

    Args:
        top: ``(trial_id, x [d], prefix_keys)`` of the top-``Q`` observations,
            best first.
        n_stages: ``K``.
        prefix_dims: ``prefix_dims[depth]``: cube dimensions of stages ``< depth``.
        is_available: ``is_available(trial_id, depth, key)``: whether the prefix
            of ``depth`` stages of that trial can be loaded.

    Returns:
        The pool, the empty prefix first; duplicates (same depth and values on
        the prefix's dimensions) are dropped.
    """
    pool = [EMPTY_PREFIX]
    seen: set[tuple[int, tuple[float, ...]]] = set()
    for trial_id, x, keys in top:
        for depth in range(1, n_stages):
            key = keys[depth - 1] if len(keys) >= depth else None
            ident = prefix_ident(x, prefix_dims[depth], depth)
            if ident in seen or not is_available(trial_id, depth, key):
                continue
            seen.add(ident)
            pool.append(Prefix(depth=depth, x=x.detach().clone(), source_trial=trial_id, key=key))
    return pool


def rank_over_pool(
    acqf: AcquisitionFunction,
    pool: Sequence[Prefix],
    prefix_dims: Sequence[Sequence[int]],
    dim: int,
    options: OptimizeOptions | None = None,
    seed: int = 0,
    keep_raw: int = 0,
) -> list[Candidate]:
    """Maximize ``acqf`` once per prefix of the pool; every restart's end point, best first.

    Each prefix scores scrambled-Sobol raw points (``raw_samples`` for the
    empty prefix, a share proportional to the free dimensions otherwise), its
    fixed dimensions overwritten with its values, and draws ``num_restarts``
    starting points from them; all restarts of all prefixes then run as one batched L-BFGS-B
    problem (see :class:`_PoolAcquisition` for how each restart keeps its own
    prefix fixed).

    Args:
        acqf: A ``q = 1`` acquisition taking ``b x 1 x d``.
        pool: The prefixes (see :func:`build_prefix_pool`); not empty.
        prefix_dims: ``prefix_dims[depth]``: cube dimensions of stages ``< depth``.
        dim: ``d``.
        options: Restarts, raw samples, iterations.
        seed: Seeds the raw samples and the choice of restarts.
        keep_raw: Also return the ``keep_raw`` best raw samples of every prefix
            (after the restarts' end points, best first): more candidates for a
            caller that picks several points (a batch).

    Returns:
        One :class:`Candidate` per restart with a finite value, best first; each
        ``x`` is ``Tensor[d]`` with its prefix's dimensions equal to the
        prefix's values. The runners-up let a caller skip a candidate it cannot
        use (one that repeats an evaluated config).
    """
    if not pool:
        raise ValueError("the prefix pool is empty; it always holds the empty prefix")
    options = options or OptimizeOptions()
    fixed, template = _pool_template(pool, prefix_dims, dim)

    raw = _sobol(dim, options.raw_samples, seed)  # R x d, shared by all prefixes
    # Prefix i scores the first n_raw[i] raw points, its fixed dimensions overwritten.
    n_free = (~fixed).sum(-1).tolist()
    n_raw = _shares(
        options.raw_samples, min(options.num_restarts, options.raw_samples), n_free, dim
    )
    X_raw = torch.cat(
        [torch.where(fixed[i], template[i], raw[: n_raw[i]]) for i in range(len(pool))]
    )  # sum(n_raw) x d
    with torch.no_grad():
        vals = _evaluate(acqf, X_raw.unsqueeze(-2), options.batch_limit)

    # Restarts, likewise, in proportion to the free dimensions: a prefix that fixes
    # most of the cube leaves a small problem that a few restarts cover.
    n_restarts = _shares(
        options.num_restarts, min(_MIN_RESTARTS, options.num_restarts), n_free, dim
    )
    X0, owners, owner = _restart_points(X_raw, vals, n_raw, n_restarts, seed)

    extra = _best_raw(X_raw, vals, n_raw, pool, keep_raw)
    wrapped = _PoolAcquisition(acqf, fixed, template)
    if not _has_gradient(wrapped, X0[:1]):
        # Every free dimension is discrete (snapped to its cells): the best raw
        # points are all there is to find; L-BFGS-B would see no gradient.
        with torch.no_grad():
            return _ranked(X0, wrapped(X0), owners, fixed, template, pool, dim) + extra
    cands, cand_vals = _run_lbfgsb(wrapped, X0, owner, dim, options.maxiter)
    return _ranked(cands, cand_vals, owners, fixed, template, pool, dim) + extra


def _pool_template(
    pool: Sequence[Prefix], prefix_dims: Sequence[Sequence[int]], dim: int
) -> tuple[Tensor, Tensor]:
    """``BoolTensor[P, d]``, which dimensions each prefix fixes, and ``Tensor[P, d]``,
    the fixed values (zero elsewhere)."""
    n_pool = len(pool)
    fixed = torch.zeros(n_pool, dim, dtype=torch.bool)
    template = torch.zeros(n_pool, dim, dtype=torch.double)
    for i, prefix in enumerate(pool):
        if prefix.depth > 0 and prefix.x is not None:
            dims = list(prefix_dims[prefix.depth])
            fixed[i, dims] = True
            template[i, dims] = prefix.x[dims].to(torch.double)
    return fixed, template


def _shares(total: int, floor: int, n_free: Sequence[int], dim: int) -> list[int]:
    """Per prefix, ``total`` in proportion to its free dimensions, at least ``floor``."""
    return [max(floor, math.ceil(total * free / max(dim, 1))) for free in n_free]


def _restart_points(
    X_raw: Tensor, vals: Tensor, n_raw: Sequence[int], n_restarts: Sequence[int], seed: int
) -> tuple[Tensor, list[int], Tensor]:
    """The restarts' starting points ``b x 1 x (d + 1)`` (last column: the owning
    prefix), the owners as a list and as ``Tensor[b]``.

    Raises:
        AcquisitionError: No raw sample of any prefix has a finite value.
    """
    starts, owners = [], []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, (X_i, vals_i) in enumerate(zip(X_raw.split(n_raw), vals.split(n_raw), strict=True)):
            x0 = _pick_restarts(X_i, vals_i, n_restarts[i])
            starts.append(x0)
            owners.extend([i] * x0.shape[0])
    if not owners:
        raise AcquisitionError(
            "every raw sample of every prefix has a non-finite acquisition value"
        )
    owner = torch.tensor(owners, dtype=torch.double)
    X0 = torch.cat([torch.cat(starts), owner.unsqueeze(-1)], dim=-1).unsqueeze(-2)  # b x 1 x d+1
    return X0, owners, owner


def _run_lbfgsb(
    wrapped: _PoolAcquisition, X0: Tensor, owner: Tensor, dim: int, maxiter: int
) -> tuple[Tensor, Tensor]:
    """All restarts from ``X0`` as one batched L-BFGS-B problem: end points and values.

    Warns (:class:`AcquisitionWarning`, attributed to the caller of
    :func:`rank_over_pool`) and returns the starting points on NaN gradients.
    """
    with warnings.catch_warnings(record=True) as caught:
        # L-BFGS-B stopping at the iteration limit or on a line-search failure
        # still returns its best point; say so at debug level only.
        warnings.simplefilter("always", OptimizationWarning)
        try:
            cands, cand_vals = gen_candidates_scipy(
                initial_conditions=X0,
                acquisition_function=wrapped,
                lower_bounds=0.0,
                upper_bounds=1.0,
                # one problem at a time if BoTorch must leave its batched L-BFGS-B path
                options={
                    "maxiter": maxiter,
                    "max_optimization_problem_aggregation_size": 1,
                },
                fixed_features={dim: owner},  # the owner column is never optimized
            )
        except OptimizationGradientError as exc:
            # NaN gradients (costs or objectives of extreme magnitude): the
            # restarts' starting points, the best raw samples, are finite.
            warnings.warn(
                f"acquisition gradient is NaN ({exc}); using the best raw samples "
                "instead of optimized candidates",
                AcquisitionWarning,
                stacklevel=3,
            )
            with torch.no_grad():
                cands, cand_vals = X0, wrapped(X0)
    for w in caught:
        if issubclass(w.category, OptimizationWarning):
            logger.debug("acquisition optimizer: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cands, cand_vals


def _best_raw(
    X_raw: Tensor, vals: Tensor, n_raw: Sequence[int], pool: Sequence[Prefix], keep: int
) -> list[Candidate]:
    """The ``keep`` best finite raw samples of every prefix, best first overall."""
    if keep <= 0:
        return []
    out = []
    for i, (X_i, vals_i) in enumerate(zip(X_raw.split(n_raw), vals.split(n_raw), strict=True)):
        finite = torch.isfinite(vals_i)
        X_f, vals_f = X_i[finite], vals_i[finite]
        for j in vals_f.argsort(descending=True)[:keep].tolist():
            out.append(Candidate(x=X_f[j].clone(), prefix=pool[i], value=float(vals_f[j])))
    out.sort(key=lambda c: -c.value)
    return out


def _ranked(
    cands: Tensor,
    cand_vals: Tensor,
    owners: list[int],
    fixed: Tensor,
    template: Tensor,
    pool: Sequence[Prefix],
    dim: int,
) -> list[Candidate]:
    """The finite candidates, best first, each with its prefix's values restored."""
    cand_vals = cand_vals.reshape(-1)
    finite = torch.isfinite(cand_vals)
    if not finite.any():
        raise AcquisitionError("the acquisition is not finite at any optimized candidate")
    ranked = []
    for j in cand_vals.argsort(descending=True).tolist():
        if not finite[j]:
            continue
        i = owners[j]
        x = torch.where(fixed[i], template[i], cands[j, 0, :dim].detach().clamp(0.0, 1.0))
        ranked.append(Candidate(x=x, prefix=pool[i], value=float(cand_vals[j])))
    return ranked


def _has_gradient(acqf: AcquisitionFunction, X: Tensor) -> bool:
    """Whether ``acqf`` at ``X`` depends differentiably on ``X``."""
    X = X.detach().clone().requires_grad_(True)
    value = acqf(X).sum()
    if not value.requires_grad:
        return False
    (grad,) = torch.autograd.grad(value, X, allow_unused=True)
    return grad is not None


class _PoolAcquisition(AcquisitionFunction):
    """``acqf`` on ``b x 1 x (d + 1)`` inputs whose last column names a prefix.

    Row ``i`` of the batch evaluates ``acqf`` at ``x`` with the dimensions of
    its prefix ``owner = X[i, 0, d]`` replaced by the prefix's values. The
    owner column is a fixed feature of the optimizer with one value per
    restart (``gen_candidates_scipy`` keeps it aligned as converged restarts
    leave the batch), so restarts of every prefix share one batched L-BFGS-B
    run; the replaced dimensions have zero gradient and stay put.

    Args:
        acqf: The acquisition on ``b x 1 x d``.
        fixed: ``BoolTensor[P, d]``, which dimensions each prefix fixes.
        template: ``Tensor[P, d]``, the fixed values.
    """

    def __init__(self, acqf: AcquisitionFunction, fixed: Tensor, template: Tensor) -> None:
        super().__init__(model=acqf.model)
        self.acqf = acqf
        self.register_buffer("fixed", fixed)
        self.register_buffer("template", template)

    def forward(self, X: Tensor) -> Tensor:
        """``X``: ``b x 1 x (d + 1)``; returns ``Tensor[b]``."""
        owner = X[..., -1].detach().round().long()  # b x 1
        x = X[..., :-1]
        x = torch.where(self.fixed[owner], self.template[owner].to(x), x)
        return self.acqf(x)


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _sobol(dim: int, n: int, seed: int) -> Tensor:
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    return engine.draw(n, dtype=torch.double)


def _evaluate(acqf: AcquisitionFunction, X: Tensor, batch_limit: int) -> Tensor:
    """``acqf`` on ``b x 1 x d`` in chunks; returns ``Tensor[b]``."""
    return torch.cat([acqf(chunk) for chunk in X.split(batch_limit)])


def _pick_restarts(X: Tensor, vals: Tensor, n: int) -> Tensor:
    """``n`` starting points of ``X`` (``raw x d``): the best, plus a Boltzmann draw
    favoring high values (BoTorch's heuristic), non-finite values dropped."""
    finite = torch.isfinite(vals)
    X, vals = X[finite], vals[finite]
    if X.shape[0] <= n:  # all of them; none when no value is finite (no restart)
        return X
    chosen, _ = initialize_q_batch(X.unsqueeze(-2), vals, n)
    chosen = chosen.squeeze(-2)
    top = X[vals.argmax()]
    if not (chosen == top).all(-1).any():
        chosen[0] = top
    return chosen
