"""Surrogate models of the engine: objective GP, stage-cost GPs, load-cost model.

Symbols (shapes in brackets):

* ``x`` [``d``]: a config's point in the unit cube; the cube spans the declared
  bounds (see :mod:`eeipu_ray.search.space`), so inputs are *not* rescaled to
  the observed range: the GP extrapolates over the whole space.
* ``y`` [``n x 1``]: objectives in maximize orientation, standardized by the
  GP's ``Standardize(m=1)`` outcome transform.
* ``C_k(x)``: compute cost of stage ``k`` (0-based, ``K`` stages). Stage ``k``'s
  cost GP models ``log C_k`` (standardized) from the cube dimensions of
  stages ``0..k`` (``upstream=True``: an upstream batch size can change a
  later stage's cost) or of stage ``k`` alone (the reference's choice).
* ``eps(delta)``: what loading a cached prefix of ``delta`` stages costs.

Kernels: Matern-5/2 with one lengthscale per dimension (ARD) and BoTorch's
dimension-scaled log-normal lengthscale prior (Hvarfner et al., 2024). Note
that BoTorch 0.18's ``SingleTaskGP`` default is an RBF kernel with that prior;
the reference uses Matern-5/2, which we keep. Categorical dimensions hold an
index cell in the cube; they get a Hamming-style kernel term
``exp(-mean_i [cell(x_i) != cell(x'_i)] / l_i)`` instead of a distance.

Fitting: ``fit_gpytorch_mll`` (L-BFGS-B on the exact marginal likelihood with
the priors), warm-started from the previous fit's hyperparameters with a
limited iteration count; a numerical failure falls back to the warm-start (or
prior) hyperparameters with a :class:`~eeipu_ray.search.errors.ModelFitWarning`.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from botorch.exceptions.errors import ModelFittingError
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.model import Model
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from botorch.posteriors import Posterior
from gpytorch.kernels import AdditiveKernel, Kernel, ProductKernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.utils.errors import NanError, NotPSDError
from torch import Tensor

from eeipu_ray.search.errors import ModelFitWarning
from eeipu_ray.search.records import TrialRecord, TrialStatus, cost_sum

logger = logging.getLogger(__name__)

# Failures of a GP fit that have a sensible fallback (keep the old hyperparameters).
_NUMERICAL_FIT_ERRORS = (ModelFittingError, NotPSDError, NanError, torch.linalg.LinAlgError)

_MIN_COST = 1e-9  # costs are floored before the log: a 0 s stage is not -inf


@dataclass(frozen=True)
class FitOptions:
    """How the GPs are fitted.

    Attributes:
        maxiter_cold: L-BFGS-B iterations for a first fit (from the prior's mode).
        maxiter_warm: Iterations for a fit warm-started from the previous one;
            one more observation moves the optimum little, so a few dozen suffice.
        max_attempts: Attempts of ``fit_gpytorch_mll`` (later ones resample the
            hyperparameters from their priors) before falling back.
        refit_growth: Hyperparameters are re-optimized once the training set
            has grown by this fraction since their last optimization (at least
            one point); in between, the GP is rebuilt on the new data with the
            last hyperparameters (exact conditioning, no optimizer run). ``0``
            re-optimizes on every new point. With 100 points and 0.1 that is a
            fit every 10 results: one more point barely moves the optimum.
    """

    maxiter_cold: int = 200
    maxiter_warm: int = 40
    max_attempts: int = 2
    refit_growth: float = 0.1

    def __post_init__(self) -> None:
        for name in ("maxiter_cold", "maxiter_warm", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FitOptions.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.refit_growth, int | float) and self.refit_growth >= 0):
            raise ValueError(f"FitOptions.refit_growth must be >= 0, got {self.refit_growth!r}")


@dataclass
class SurrogateModels:
    """The fitted models one acquisition step uses.

    Attributes:
        objective: GP of ``y`` on ``x`` (``n x d`` -> 1 output).
        stage_costs: ``K`` GPs of ``log C_k`` as one ``ModelListGP`` (``K`` outputs),
            every model taking the full ``x``; ``None`` when not needed.
        total_cost: GP of ``log sum_k C_k`` (EIPS / CArBO); ``None`` when not needed.
        load_costs: ``Tensor[K]``, ``eps(delta)`` for ``delta = 0..K-1`` (``eps(0) = 0``).
        best_f: The incumbent on the objective GP's scale (after the warping,
            :func:`warp_objective`).
    """

    objective: SingleTaskGP
    stage_costs: ModelListGP | None
    total_cost: SingleTaskGP | None
    load_costs: Tensor
    best_f: float = math.nan


class GPFitter:
    """Fits the engine's GPs, remembering hyperparameters to warm-start the next fit.

    Args:
        categories: ``n_categories`` per cube dimension (0 for non-categorical).
        options: Iteration limits.

    Example:
        >>> fitter = GPFitter(categories=[0, 0])
        >>> X = torch.rand(8, 2, dtype=torch.double)
        >>> gp = fitter.fit("objective", X, X.sum(-1, keepdim=True))
    """

    def __init__(self, categories: Sequence[int], options: FitOptions | None = None) -> None:
        self.categories = [int(c) for c in categories]
        self.options = options or FitOptions()
        self._states: dict[str, dict[str, Tensor]] = {}
        self._fitted_n: dict[str, int] = {}  # training-set size at the last optimization

    def fit(
        self,
        name: str,
        X: Tensor,
        Y: Tensor,
        active_dims: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> SingleTaskGP:
        """Fit (or refit) the GP called ``name``.

        Args:
            name: Identifies the model across calls (its warm-start slot).
            X: ``n x d`` training inputs in the unit cube.
            Y: ``n x 1`` training targets (standardized inside the model).
            active_dims: Cube dimensions the kernel looks at (default: all).
            groups: Cube dimensions of each stage: the kernel is the stage-additive
                one (:func:`make_kernel`); ``None``: one joint kernel.

        Returns:
            The fitted model in eval mode.
        """
        d = X.shape[-1]
        active = list(range(d)) if active_dims is None else sorted(set(active_dims))
        state = self._states.get(name)
        model = self._build(X, Y, active, state, groups)
        n, last = X.shape[0], self._fitted_n.get(name)
        if state is not None and last is not None and n < last * (1 + self.options.refit_growth):
            return model.eval()  # same hyperparameters, new data
        maxiter = self.options.maxiter_warm if state is not None else self.options.maxiter_cold
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        try:
            with warnings.catch_warnings():
                # "Iteration limit reached" is expected with the short warm fits.
                warnings.filterwarnings("ignore", message=r".*ITERATIONS REACHED LIMIT.*")
                fit_gpytorch_mll(
                    mll,
                    optimizer_kwargs={"options": {"maxiter": maxiter}},
                    max_attempts=self.options.max_attempts,
                )
        except _NUMERICAL_FIT_ERRORS as exc:
            warnings.warn(
                f"GP {name!r} could not be fitted on {X.shape[0]} points ({exc}); using "
                f"{'the previous' if state is not None else 'the prior'} hyperparameters",
                ModelFitWarning,
                stacklevel=2,
            )
            model = self._build(X, Y, active, state, groups)
            model.eval()
            return model
        model.eval()
        self._states[name] = _hyperparameters(model)
        self._fitted_n[name] = n
        return model

    def forget(self) -> None:
        """Drop every warm-start state (the next fits start from the priors)."""
        self._states.clear()
        self._fitted_n.clear()

    def state_dict(self) -> dict[str, Any]:
        """The warm-start states as plain lists (JSON-able), for checkpoints.

        A restored fitter warm-starts its first fit, and skips the optimizer
        while the data has not grown past ``refit_growth``, instead of a cold
        fit from the priors.
        """
        return {
            name: {
                "n": self._fitted_n.get(name, 0),
                "params": {
                    k: {"shape": list(v.shape), "values": v.flatten().tolist()}
                    for k, v in state.items()
                },
            }
            for name, state in self._states.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; malformed entries are skipped (cold fit)."""
        self.forget()
        for name, entry in state.items():
            try:
                params = {
                    k: torch.tensor(v["values"], dtype=torch.double).reshape(v["shape"])
                    for k, v in entry["params"].items()
                }
                n = int(entry["n"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                logger.warning("GP state %r not restored (%s); it will be fitted cold", name, exc)
                continue
            self._states[str(name)] = params
            self._fitted_n[str(name)] = n

    def _build(
        self, X: Tensor, Y: Tensor, active: list[int], state: dict[str, Tensor] | None,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> SingleTaskGP:
        covar = make_kernel(active, self.categories, groups)
        model = SingleTaskGP(X, Y, covar_module=covar, outcome_transform=Standardize(m=1))
        if state is not None:
            try:
                model.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shapes from another space (a foreign checkpoint)
                logger.warning(
                    "GP warm-start state does not fit (%s); starting from the prior", exc
                )
                model = SingleTaskGP(X, Y, covar_module=covar, outcome_transform=Standardize(m=1))
        return model


def make_kernel(
    active_dims: Sequence[int],
    categories: Sequence[int],
    groups: Sequence[Sequence[int]] | None = None,
) -> Kernel:
    """Matern-5/2 ARD on the continuous/ordinal dims times a categorical kernel.

    With ``groups`` (one per stage), the stage-additive kernel
    ``s_0 k(x, x') + sum_k s_k k_k(x_k, x'_k)``: the joint kernel over
    ``active_dims`` plus one kernel per stage over that stage's dimensions,
    each with its own output scale. The joint part keeps every interaction
    between stages; the stage parts let the model credit a stage with its
    share of the objective from trials that differ in that stage only.

    Args:
        active_dims: Cube dimensions the kernel uses.
        categories: ``n_categories`` per cube dimension (0 if not categorical).
        groups: Cube dimensions of each stage (stages without one are skipped).

    Returns:
        A kernel on full ``... x n x d`` inputs that reads only ``active_dims``.
    """
    if groups is not None:
        parts = [list(g) for g in groups if g and set(g) <= set(active_dims)]
        if len(parts) > 1:
            return AdditiveKernel(
                ScaleKernel(make_kernel(active_dims, categories)),
                *(ScaleKernel(make_kernel(g, categories)) for g in parts),
            )
    cont = [i for i in active_dims if categories[i] == 0]
    cat = [i for i in active_dims if categories[i] > 0]
    kernels: list[Kernel] = []
    if cont:
        kernels.append(
            get_covar_module_with_dim_scaled_prior(
                ard_num_dims=len(cont), use_rbf_kernel=False, active_dims=cont
            )
        )
    if cat:
        kernels.append(CubeCategoricalKernel([categories[i] for i in cat], active_dims=cat))
    if not kernels:  # no dimension at all: the cost is one constant
        return _constant_kernel()
    return kernels[0] if len(kernels) == 1 else ProductKernel(*kernels)


class CubeCategoricalKernel(Kernel):
    r"""Hamming-style kernel on categorical cube coordinates.

    A categorical dimension with ``n`` choices stores ``(j + 1/2) / n`` for
    choice ``j``; this kernel compares the cells ``floor(x * n)``:

    .. math::
        k(x, x') = \exp\Big(-\frac{1}{m}\sum_{i=1}^{m}
                   \frac{[\mathrm{cell}(x_i) \ne \mathrm{cell}(x'_i)]}{l_i}\Big)

    Its gradient in ``x`` is zero: the acquisition optimizer picks categories
    among its raw samples and leaves them there.

    Args:
        n_categories: Choices per (active) dimension, length ``m``.
        **kwargs: Passed to :class:`gpytorch.kernels.Kernel` (e.g. ``active_dims``).
    """

    has_lengthscale = True

    def __init__(self, n_categories: Sequence[int], **kwargs) -> None:
        super().__init__(ard_num_dims=len(n_categories), **kwargs)
        self.register_buffer("n_categories", torch.tensor([max(int(n), 1) for n in n_categories]))

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params) -> Tensor:
        n = self.n_categories.to(x1)
        c1 = (x1 * n).floor().clamp(max=n - 1)
        c2 = (x2 * n).floor().clamp(max=n - 1)
        if diag:
            delta = (c1 != c2).to(x1.dtype)
            return torch.exp(-(delta / self.lengthscale).mean(-1))
        delta = (c1.unsqueeze(-2) != c2.unsqueeze(-3)).to(x1.dtype)
        return torch.exp(-(delta / self.lengthscale.unsqueeze(-2)).mean(-1))


class LoadCostModel:
    r"""What loading a cached prefix of ``delta`` stages costs, ``eps(delta)``.

    The runner charges a loaded prefix as one load (of its deepest entry), so the
    unit of observation is a trial's loaded cost ``sum_{k <= delta}`` of its
    ``stage_costs`` at its ``memoized_stages = delta``; ``eps(delta)`` plays the
    part of :math:`\sum_{k \le \delta} \epsilon_k` in the EEIPU formula.

    Estimator: the geometric mean of the observed loaded costs at depth
    ``delta``, shrunk toward a prior of ``prior_per_stage * delta`` (the
    reference's constant 0.1 per stage) by ``pseudo_count`` pseudo-observations:

    .. math::
        \log \epsilon(\delta) = \frac{c \log(p \delta) + \sum_i \log \ell_i}{c + n_\delta}

    Why this and not a GP: load time depends on bytes and storage layer, not on
    the hyperparameters in a smooth way; it is small next to compute costs, so
    a robust per-depth location estimate suffices. The log scale keeps one slow
    cold read (S3 vs. local disk) from dominating, and the prior keeps the
    estimate sane before any load was observed.

    Args:
        n_stages: ``K``.
        prior_per_stage: Prior load cost per stage, in cost units.
        pseudo_count: Weight of the prior, in observations.

    Example:
        >>> m = LoadCostModel(3)
        >>> m.observe(1, 0.4)
        >>> [round(v, 3) for v in m.prefix_costs().tolist()]
        [0.0, 0.2, 0.2]
    """

    def __init__(
        self, n_stages: int, prior_per_stage: float = 0.1, pseudo_count: float = 1.0
    ) -> None:
        if not prior_per_stage > 0:
            raise ValueError(f"prior_per_stage must be > 0, got {prior_per_stage!r}")
        if not pseudo_count > 0:
            raise ValueError(f"pseudo_count must be > 0, got {pseudo_count!r}")
        self.n_stages = n_stages
        self.prior_per_stage = float(prior_per_stage)
        self.pseudo_count = float(pseudo_count)
        self._log_sum = [0.0] * (n_stages + 1)
        self._count = [0] * (n_stages + 1)

    @classmethod
    def from_records(
        cls,
        records: Sequence[TrialRecord],
        n_stages: int,
        prior_per_stage: float = 0.1,
        pseudo_count: float = 1.0,
    ) -> LoadCostModel:
        """Build from the finished records that loaded a prefix."""
        model = cls(n_stages, prior_per_stage, pseudo_count)
        for record in records:
            if record.finished and record.memoized_stages > 0:
                cost = record.loaded_cost
                if cost is not None:
                    model.observe(record.memoized_stages, cost)
        return model

    def observe(self, depth: int, cost: float) -> None:
        """Record that loading a prefix of ``depth`` stages cost ``cost``."""
        if not 1 <= depth <= self.n_stages or not math.isfinite(cost) or cost < 0:
            return
        self._log_sum[depth] += math.log(max(cost, _MIN_COST))
        self._count[depth] += 1

    def prefix_costs(self) -> Tensor:
        """``Tensor[K]``: ``eps(delta)`` for ``delta = 0..K-1`` (double)."""
        out = [0.0]
        for depth in range(1, self.n_stages):
            prior = math.log(self.prior_per_stage * depth)
            c, n = self.pseudo_count, self._count[depth]
            out.append(math.exp((c * prior + self._log_sum[depth]) / (c + n)))
        return torch.tensor(out, dtype=torch.double)


def fit_surrogates(
    fitter: GPFitter,
    records: Sequence[TrialRecord],
    stage_dims: Sequence[Sequence[int]],
    *,
    need_stage_costs: bool,
    need_total_cost: bool,
    upstream: bool = True,
    load_prior: float = 0.1,
    warping: str = "none",
    kernel: str = "joint",
) -> SurrogateModels:
    """Fit every model one acquisition step needs, from the trial records.

    Args:
        fitter: Holds the warm-start states.
        records: All records (pending ones are skipped).
        stage_dims: Per stage ``k``, its cube dimensions.
        need_stage_costs: Fit the ``K`` stage-cost GPs (EEIPU).
        need_total_cost: Fit the total-cost GP (EIPS, CArBO).
        upstream: Stage ``k``'s cost GP sees stages ``0..k`` (else only ``k``).
        load_prior: Prior load cost per stage (see :class:`LoadCostModel`).
        warping: How the objectives are warped before the objective GP
            (:func:`warp_objective`).
        kernel: The objective GP's kernel: ``"joint"`` (one Matern over every
            dimension) or ``"stage_additive"`` (:func:`make_kernel` with the
            stages as groups).

    Returns:
        The fitted :class:`SurrogateModels`.

    Raises:
        ValueError: no completed record to fit the objective on.
    """
    done = [r for r in records if r.status is TrialStatus.COMPLETED]
    if not done:
        raise ValueError("no completed trial to fit the objective GP on")
    X = torch.stack([r.x for r in done]).to(torch.double)
    Y = torch.tensor([[float(r.objective)] for r in done], dtype=torch.double)  # type: ignore[arg-type]
    Y = warp_objective(Y, warping)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    groups = stage_dims if kernel == "stage_additive" else None
    objective = fitter.fit("objective", X, Y, groups=groups)
    n_stages = len(stage_dims)
    d = X.shape[-1]

    stage_costs = None
    if need_stage_costs:
        models = []
        for k in range(n_stages):
            Xk, Yk = _stage_cost_data(records, k, stage_dims)
            active = (
                [i for j in range(k + 1) for i in stage_dims[j]]
                if upstream
                else list(stage_dims[k])
            )
            models.append(_fit_cost(fitter, f"cost/{k}", Xk, Yk, active, d))
        stage_costs = ModelListGP(*models)

    total_cost = None
    if need_total_cost:
        Xt, Yt = _total_cost_data(records)
        total_cost = _fit_cost(fitter, "cost/total", Xt, Yt, list(range(d)), d)

    load = LoadCostModel.from_records(records, n_stages, prior_per_stage=load_prior)
    return SurrogateModels(
        objective, stage_costs, total_cost, load.prefix_costs(), best_f=float(Y.max())
    )


WARPINGS = ("none", "power", "copula")
KERNELS = ("joint", "stage_additive")


def warp_objective(Y: Tensor, warping: str = "none") -> Tensor:
    r"""A monotone (order-keeping) transform of the objectives before the GP.

    Heavy-tailed objectives (a few configurations hundreds of units worse than
    the rest) make a GP on standardized values spend its fit on the outliers:
    the good region, where the search must resolve differences, is flat on the
    GP's scale and EI follows the variance to the corners. A monotone warping
    keeps the order of the configurations, so the best one stays the best, and
    EI is then computed on the warped scale (as HEBO does).

    Args:
        Y: ``n x 1`` objectives (maximized).
        warping: ``"none"``; ``"power"``: standardize, then a Yeo-Johnson power
            transform with its exponent fitted by maximum likelihood (clipped
            to ``[0, 2]``; 1 is the identity, 2 compresses a long lower tail
            logarithmically); ``"copula"``: the normal scores of the ranks
            (``Phi^-1((rank - 1/2) / n)``, ties averaged), which keeps only the
            order.

    Returns:
        ``n x 1`` warped objectives (the identity for ``"none"`` or fewer than
        three distinct values).

    Example:
        >>> Y = torch.tensor([[-100.0], [-3.0], [-2.0], [-1.0]], dtype=torch.double)
        >>> W = warp_objective(Y, "power")
        >>> bool((W.argsort(0) == Y.argsort(0)).all())
        True
    """
    if warping not in WARPINGS:
        raise ValueError(f"warping={warping!r} is not one of {WARPINGS}")
    if warping == "none" or torch.unique(Y).numel() < 3:
        return Y
    y = Y.reshape(-1).to(torch.double)
    if warping == "copula":
        from scipy.stats import norm, rankdata

        ranks = torch.as_tensor(rankdata(y.numpy(), method="average"), dtype=torch.double)
        scores = norm.ppf(((ranks - 0.5) / y.numel()).numpy())
        return torch.as_tensor(scores, dtype=Y.dtype).reshape(Y.shape)
    from scipy.stats import yeojohnson, yeojohnson_normmax

    y = y / y.abs().max()  # finite even for values near the float limits
    z = ((y - y.mean()) / y.std()).numpy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lam = float(yeojohnson_normmax(z))
            warped = torch.as_tensor(
                yeojohnson(z, lmbda=min(max(lam, 0.0), 2.0) if math.isfinite(lam) else 1.0),
                dtype=Y.dtype,
            ).reshape(Y.shape)
    except (ValueError, FloatingPointError):  # no finite maximum: leave the scale alone
        return Y
    if not _keeps_order(Y, warped):  # rounding merged or swapped values: unusable
        return Y
    return warped


def _keeps_order(Y: Tensor, W: Tensor) -> bool:
    """Whether ``W`` is finite and strictly increasing wherever ``Y`` is."""
    if not bool(torch.isfinite(W).all()):
        return False
    order = Y.reshape(-1).argsort()
    y, w = Y.reshape(-1)[order], W.reshape(-1)[order]
    rises = y[1:] > y[:-1]
    return bool((w[1:][rises] > w[:-1][rises]).all() and (w[1:] >= w[:-1]).all())


class MarginalGP(Model):
    r"""Fast ``q = 1`` predictive marginals of a fitted exact GP.

    BoTorch's ``posterior`` builds lazy joint distributions for general ``q``;
    the acquisitions here only need, per point, the marginal mean and variance

    .. math::
        \mu(x) = m(x) + k_x^\top \alpha, \quad
        \sigma^2(x) = k(x, x) - \| L^{-1} k_x \|^2, \quad
        L L^\top = K + \sigma_n^2 I, \quad \alpha = (L L^\top)^{-1} (y - m(X)),

    computed here with plain tensor algebra from the GP's own kernel, mean,
    noise and outcome transform (equal to ``gp.posterior`` to rounding, several
    times faster). ``L`` and ``alpha`` are computed once.

    Pending points (kriging believer): each pending ``x_p`` is added to the
    training set with the GP's own mean ``mu(x_p)`` as its value. The mean is
    unchanged while the variance at and near ``x_p`` collapses, so EI there
    drops and parallel workers are sent elsewhere; hyperparameters are not
    refit. Where ``mu(x_p)`` beats the incumbent, the believer's incumbent is
    ``mu(x_p)`` (:attr:`believed_max`): an acquisition must use it, or EI near
    a point predicted well above the incumbent (``mu - f* >> sigma``) would not
    drop at all. This keeps the analytic (exact, smooth) log-EI for ``q = 1``, where
    ``qLogExpectedImprovement`` with ``X_pending`` would add Monte-Carlo noise
    to every evaluation.

    Args:
        gp: A fitted single-output exact GP (``SingleTaskGP``) in eval mode.
        X_pending: ``p x d`` points being evaluated, or ``None``.

    Example:
        >>> X = torch.rand(8, 2, dtype=torch.double)
        >>> gp = GPFitter([0, 0]).fit("objective", X, X.sum(-1, keepdim=True))
        >>> fast = MarginalGP(gp, X_pending=torch.rand(2, 2, dtype=torch.double))
        >>> fast.posterior(torch.rand(5, 1, 2, dtype=torch.double)).mean.shape
        torch.Size([5, 1, 1])
    """

    num_outputs = 1

    def __init__(self, gp: SingleTaskGP, X_pending: Tensor | None = None) -> None:
        super().__init__()
        # Only the kernel and mean are kept as submodules: BoTorch acquisitions
        # call ``.to(X)`` on every evaluation, which walks all submodules.
        self.covar_module = gp.covar_module
        self.mean_module = gp.mean_module
        with torch.no_grad():
            X = gp.train_inputs[0]
            y = gp.train_targets.unsqueeze(-1)  # transformed (standardized) scale
            self.register_buffer("noise", gp.likelihood.noise.detach().reshape(()).clone())
            L, alpha = self._factor(X, y)
            y_p = None
            if X_pending is not None and X_pending.shape[0] > 0:
                Xp = X_pending.to(X)
                y_p = self._predict(Xp, X, L, alpha)[0]  # believe the mean
                X, y = torch.cat([X, Xp]), torch.cat([y, y_p.unsqueeze(-1)])
                L, alpha = self._factor(X, y)
        self.register_buffer("train_X", X)
        self.register_buffer("chol", L)
        self.register_buffer("alpha", alpha)
        transform = getattr(gp, "outcome_transform", None)
        shift = transform.means.reshape(()) if transform is not None else torch.zeros(())
        scale = transform.stdvs.reshape(()) if transform is not None else torch.ones(())
        self.register_buffer("y_shift", shift.detach().to(X))
        self.register_buffer("y_scale", scale.detach().to(X))
        # The largest believed value, original scale: a believer's incumbent.
        self.believed_max: float | None = (
            None if y_p is None else float((y_p * self.y_scale + self.y_shift).max())
        )

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any = None,
    ) -> MarginalPosterior:
        """Marginal posterior at ``X`` (``batch_shape x 1 x d``), original scale.

        Returns:
            A :class:`MarginalPosterior` with mean and variance ``batch_shape x 1 x 1``.
        """
        if posterior_transform is not None or observation_noise is not False:
            raise NotImplementedError("MarginalGP supports neither transforms nor noise")
        if X.shape[-2] != 1:
            raise NotImplementedError(f"MarginalGP needs q = 1, got X of shape {tuple(X.shape)}")
        flat = X.reshape(-1, X.shape[-1])
        mean, var = self._predict(flat, self.train_X, self.chol, self.alpha)
        shape = (*X.shape[:-1], 1)
        mean = (mean * self.y_scale + self.y_shift).reshape(shape)
        var = (var.clamp_min(1e-12) * self.y_scale**2).reshape(shape)
        return MarginalPosterior(mean, var)

    def _factor(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        K = self.covar_module(X).to_dense()
        L = _cholesky(K + self.noise * torch.eye(X.shape[0], dtype=X.dtype))
        resid = y - self.mean_module(X).unsqueeze(-1)
        return L, torch.cholesky_solve(resid, L)

    def _predict(self, Xq: Tensor, X: Tensor, L: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance (transformed scale) at ``Xq`` (``b x d``): ``b`` and ``b``."""
        k = self.covar_module(Xq, X).to_dense()  # b x n
        mean = self.mean_module(Xq) + (k @ alpha).squeeze(-1)
        v = torch.linalg.solve_triangular(L, k.transpose(-1, -2), upper=False)  # n x b
        prior_var = self.covar_module(Xq, diag=True)
        return mean, prior_var - (v * v).sum(-2)


class MarginalPosterior(Posterior):
    """Independent normal marginals: what ``q = 1`` analytic acquisitions read.

    Args:
        mean: ``batch_shape x 1 x 1``.
        variance: ``batch_shape x 1 x 1``.
    """

    def __init__(self, mean: Tensor, variance: Tensor) -> None:
        self._mean = mean
        self._variance = variance

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def variance(self) -> Tensor:
        return self._variance

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self._mean.dtype

    @property
    def base_sample_shape(self) -> torch.Size:
        return self._mean.shape

    @property
    def batch_range(self) -> tuple[int, int]:
        return (0, -2)

    def _extended_shape(self, sample_shape: torch.Size = torch.Size()) -> torch.Size:  # noqa: B008
        return torch.Size(sample_shape) + self._mean.shape

    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        """``mean + std * base_samples`` (base samples ``sample_shape x batch x 1 x 1``)."""
        return self._mean + self._variance.sqrt() * base_samples

    def rsample(self, sample_shape: torch.Size | None = None) -> Tensor:
        """Samples ``sample_shape x batch_shape x 1 x 1``."""
        shape = self._extended_shape(sample_shape or torch.Size())
        z = torch.randn(shape, dtype=self.dtype, device=self.device)
        return self.rsample_from_base_samples(torch.Size(sample_shape or ()), z)


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _hyperparameters(model: SingleTaskGP) -> dict[str, Tensor]:
    # Warm-start state: everything but the outcome transform's statistics, which
    # depend on the new data and are recomputed when the model is built.
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("outcome_transform")
    }


def _cholesky(K: Tensor) -> Tensor:
    """Cholesky factor of ``K``, adding jitter (as GPyTorch does) if it is not PD."""
    L, info = torch.linalg.cholesky_ex(K)
    jitter = 1e-8 * K.diagonal().mean().clamp_min(1e-12)
    for _ in range(6):
        if int(info) == 0:
            return L
        L, info = torch.linalg.cholesky_ex(K + jitter * torch.eye(K.shape[-1], dtype=K.dtype))
        jitter = jitter * 10
    if int(info) != 0:
        raise NotPSDError("kernel matrix is not positive definite even with jitter")
    return L


def _constant_kernel() -> Kernel:
    from gpytorch.kernels import ConstantKernel

    return ConstantKernel()


def _stage_cost_data(
    records: Sequence[TrialRecord], k: int, stage_dims: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor]:
    """``(X, log C_k)`` from trials that report stage ``k``'s compute cost.

    A loaded stage's compute cost is the producer's original one: keep only the
    first observation per distinct prefix ``x[stages 0..k]``, so a popular
    cached prefix does not count many times.
    """
    dims = [i for j in range(k + 1) for i in stage_dims[j]]
    seen: set[tuple[float, ...]] = set()
    xs, ys = [], []
    # Executed observations first: they are the measurements, loads are copies.
    ordered = sorted((r for r in records if r.finished), key=lambda r: k < r.memoized_stages)
    for r in ordered:
        costs = r.compute_costs
        if len(costs) <= k or costs[k] is None:
            continue
        key = tuple(round(float(v), 12) for v in r.x[dims].tolist())
        if key in seen:
            continue
        seen.add(key)
        xs.append(r.x)
        ys.append(math.log(max(float(costs[k]), _MIN_COST)))  # type: ignore[arg-type]
    if not xs:
        return torch.empty(0, 0, dtype=torch.double), torch.empty(0, 1, dtype=torch.double)
    return torch.stack(xs).to(torch.double), torch.tensor(ys, dtype=torch.double).unsqueeze(-1)


def _total_cost_data(records: Sequence[TrialRecord]) -> tuple[Tensor, Tensor]:
    """``(X, log sum_k C_k)`` from trials that report every stage's compute cost."""
    xs, ys = [], []
    for r in records:
        costs = r.compute_costs
        if not r.finished or not costs or any(c is None for c in costs):
            continue
        xs.append(r.x)
        # min(): finite costs whose sum overflows keep a finite log (the GP needs one).
        total = min(cost_sum(c for c in costs if c is not None), sys.float_info.max)
        ys.append(math.log(max(total, _MIN_COST)))
    if not xs:
        return torch.empty(0, 0, dtype=torch.double), torch.empty(0, 1, dtype=torch.double)
    return torch.stack(xs).to(torch.double), torch.tensor(ys, dtype=torch.double).unsqueeze(-1)


def _fit_cost(
    fitter: GPFitter, name: str, X: Tensor, Y: Tensor, active: list[int], d: int
) -> SingleTaskGP:
    if X.shape[0] == 0:
        # No cost observed yet (every trial failed before reporting one): assume a
        # unit cost everywhere rather than guess a shape.
        warnings.warn(
            f"no cost observations for {name!r}; assuming a cost of 1 unit everywhere",
            ModelFitWarning,
            stacklevel=3,
        )
        X = torch.full((1, d), 0.5, dtype=torch.double)
        Y = torch.zeros(1, 1, dtype=torch.double)
    return fitter.fit(name, X, Y, active_dims=active)
