r"""Acquisition functions, all in log space, as BoTorch ``AcquisitionFunction``\ s.

Every acquisition here is log-EI plus an optional cost term:

.. math::
    \alpha(x) = \log \mathrm{EI}(x) + \eta \log \mathbb{E}\Big[
        \frac{1}{\epsilon(\delta(x)) + \sum_{k \ge \delta(x)} C_k(x)} \Big]

=========  ===================================  ===============  =============
name       cost model ``C``                     ``delta(x)``     ``eta``
=========  ===================================  ===============  =============
EI         none                                 -                0
EIPS       one total-cost GP                    0                1
CArBO      one total-cost GP                    0                cost cooling
EEIPU      ``K`` stage-cost GPs + load costs    cached stages    cost cooling
=========  ===================================  ===============  =============

``delta(x)`` is the number of leading stages of ``x`` whose outputs are cached
(``x`` agrees, on those stages' dimensions, with an available prefix);
``eps(delta)`` is the cost of loading them (``eps(0) = 0``). Costs are
log-normal under the GPs (each models ``log C_k``); the expectation is a QMC
average of ``1 / cost`` over ``mc_samples`` posterior samples, in linear space
(costs clamped below ``exp(700)``, inverse costs above ``1e-300``), and its log
is what enters ``alpha``.

References:
    Essofi et al., "Reducing Hyperparameter Tuning Costs in ML, Vision and
    Language Model Training Pipelines via Memoization-Awareness",
    arXiv:2411.03731 (EEIPU). Snoek et al., NeurIPS 2012 (EIPS). Lee et al.,
    "Cost-aware Bayesian Optimization", arXiv:2003.10870 (CArBO, cost cooling).
    Ament et al., "Unexpected Improvements to Expected Improvement",
    NeurIPS 2023 (log-EI).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from botorch.acquisition import AcquisitionFunction, LogExpectedImprovement
from botorch.exceptions.errors import UnsupportedError
from botorch.models.model import Model
from botorch.sampling import MCSampler
from botorch.utils.sampling import draw_sobol_normal_samples
from botorch.utils.transforms import t_batch_mode_transform
from torch import Tensor

from eeipu_ray.cooling import cost_cooling  # noqa: F401 (re-exported)


class CachedPrefixes:
    """The prefixes that are cached (or about to be), to compute ``delta(x)``.

    Args:
        points: ``{depth: Tensor[m, |dims(depth)|]}``: cube coordinates of the
            available prefixes of ``depth`` stages, on those stages' dimensions.
        prefix_dims: ``prefix_dims[depth]`` lists the cube dimensions of stages
            ``0 .. depth - 1``.
        snap: Maps ``... x d`` cube points to the centers of their grid /
            categorical cells (``SearchSpace.snap``), so ``x`` anywhere in a
            cached value's cell counts as that value. Identity if ``None``.
        atol: Tolerance of the comparison on continuous coordinates.

    Example:
        >>> cached = CachedPrefixes({1: torch.tensor([[0.25]])}, [[], [0], [0, 1]])
        >>> cached.depth(torch.tensor([[[0.25, 0.9]], [[0.5, 0.9]]])).tolist()
        [[1], [0]]
    """

    def __init__(
        self,
        points: Mapping[int, Tensor],
        prefix_dims: Sequence[Sequence[int]],
        snap: Callable[[Tensor], Tensor] | None = None,
        atol: float = 1e-9,
    ) -> None:
        self.points = {int(k): v for k, v in points.items() if v.numel() > 0}
        self.prefix_dims = [list(d) for d in prefix_dims]
        self.snap = snap
        self.atol = atol

    def __bool__(self) -> bool:
        return bool(self.points)

    def depth(self, X: Tensor) -> Tensor:
        """``delta(x)``: the deepest available prefix each point agrees with.

        Args:
            X: ``batch_shape x d``.

        Returns:
            ``LongTensor[batch_shape]`` in ``0 .. K - 1``.
        """
        delta = torch.zeros(X.shape[:-1], dtype=torch.long, device=X.device)
        if not self.points:
            return delta
        Xs = self.snap(X.detach()) if self.snap is not None else X.detach()
        for depth in sorted(self.points, reverse=True):  # deepest match wins
            dims = self.prefix_dims[depth]
            P = self.points[depth].to(Xs)  # encoded configs: already cell centers
            close = (Xs[..., dims].unsqueeze(-2) - P).abs() <= self.atol  # ... x m x |dims|
            match = close.all(-1).any(-1)
            delta = torch.where((delta == 0) & match, torch.full_like(delta, depth), delta)
        return delta


class LogExpectedInverseCost(torch.nn.Module):
    r"""``log E[1 / (eps(delta(x)) + sum_{k >= delta(x)} C_k(x))]`` by QMC.

    By default the ``K`` outputs are treated as independent (true for a
    ``ModelListGP`` of per-stage GPs) and, since ``q = 1``, each needs only its
    marginal ``N(mu_k(x), sigma_k(x)^2)``: the samples are
    ``mu_k + sigma_k z_{s,k}`` with fixed scrambled-Sobol normal base samples
    ``z`` (``mc_samples x K``, what a ``SobolQMCNormalSampler`` draws), the
    same for every ``x`` (common random numbers: a smooth, deterministic
    function for L-BFGS). Passing a ``sampler`` draws joint posterior samples
    instead (correlated outputs; mock posteriors in tests).

    Args:
        cost_model: A model with ``K`` outputs whose posterior is over
            ``log C_k(x)`` (e.g. a ``ModelListGP`` of log-cost GPs). ``K = 1``
            for a total-cost model.
        load_costs: ``Tensor[K]``, ``eps(delta)`` for ``delta = 0..K-1``
            (``eps(0)`` is ignored: nothing is loaded). Default: zeros.
        cached: Which prefixes are cached; ``None``: nothing is (``delta = 0``).
        sampler: Draws joint posterior samples; default: marginal QMC (above).
        mc_samples: Number of QMC samples when ``sampler`` is not given.
        seed: Seed of the base samples.
        overhead: A fixed cost added to every candidate's (``>= 0``, cost units):
            what starting any trial costs besides its stages. With 0, a
            candidate whose costly prefix is cached is charged only its
            remaining stages, and the ratio ``EI / C`` then favours the
            cheapest corner of those stages however poor it is; an overhead
            bounds how much a cheap suffix can multiply ``EI``.
    """

    def __init__(
        self,
        cost_model: Model,
        load_costs: Tensor | None = None,
        cached: CachedPrefixes | None = None,
        sampler: MCSampler | None = None,
        mc_samples: int = 512,
        seed: int = 0,
        overhead: float = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(float(overhead)) and float(overhead) >= 0):
            raise ValueError(f"overhead must be finite and >= 0, got {overhead!r}")
        self.overhead = float(overhead)
        self.cost_model = cost_model
        self.n_stages = int(cost_model.num_outputs)
        if load_costs is None:
            load_costs = torch.zeros(self.n_stages, dtype=torch.double)
        if load_costs.shape != (self.n_stages,):
            raise ValueError(
                f"load_costs must have shape ({self.n_stages},), got {tuple(load_costs.shape)}"
            )
        self.register_buffer("load_costs", load_costs.to(torch.double))
        self.cached = cached
        self.sampler = sampler
        self.register_buffer(
            "base_samples",
            draw_sobol_normal_samples(self.n_stages, mc_samples, dtype=torch.double, seed=seed),
        )  # mc x K

    def forward(self, X: Tensor) -> Tensor:
        """Evaluate on ``X`` of shape ``b x 1 x d``; returns ``Tensor[b]``."""
        if X.shape[-2] != 1:
            raise UnsupportedError(f"q must be 1, got X of shape {tuple(X.shape)}")
        if self.sampler is not None:
            log_costs = self.sampler(self.cost_model.posterior(X))  # mc x b x 1 x K
        else:
            mean, std = _marginal_mean_std(self.cost_model, X)  # b x 1 x K each
            z = self.base_samples.to(X)
            log_costs = mean + std * z.reshape(z.shape[0], *([1] * (mean.dim() - 1)), -1)
        delta = (
            self.cached.depth(X)
            if self.cached
            else torch.zeros(X.shape[:-1], dtype=torch.long, device=X.device)
        )  # b x 1
        return _log_expected_inverse_cost(
            log_costs, delta, self.load_costs.to(X), self.overhead
        ).squeeze(-1)


class CostAwareLogEI(AcquisitionFunction):
    r"""``log EI(x) + eta * log E[1 / C(x)]`` for ``q = 1``.

    The cost term is a plug-in (:class:`LogExpectedInverseCost`), as BoTorch's
    ``InverseCostWeightedUtility(log=True)``; ``eta = 0`` gives log-EI exactly
    (the cost term is then not evaluated).

    Args:
        model: The objective model (maximized).
        best_f: The incumbent, in the model's output scale.
        cost: The cost plug-in; ``None`` only with ``eta = 0``.
        eta: Cost exponent in ``[0, 1]`` (see :func:`cost_cooling`).

    Example:
        >>> from botorch.models import SingleTaskGP
        >>> X = torch.rand(8, 2, dtype=torch.double)
        >>> gp = SingleTaskGP(X, X.sum(-1, keepdim=True))
        >>> log_cost_gp = SingleTaskGP(X, 2 * X[:, :1])
        >>> acqf = CostAwareLogEI(gp, best_f=2.0, cost=LogExpectedInverseCost(log_cost_gp),
        ...                       eta=0.8)
        >>> acqf(torch.rand(5, 1, 2, dtype=torch.double)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        model: Model,
        best_f: float | Tensor,
        cost: LogExpectedInverseCost | None,
        eta: float = 1.0,
    ) -> None:
        super().__init__(model=model)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
        if cost is None and eta > 0:
            raise ValueError("a cost plug-in is required when eta > 0")
        self.log_ei = LogExpectedImprovement(model=model, best_f=best_f)
        self.log_inverse_cost = cost
        self.eta = float(eta)

    @t_batch_mode_transform(expected_q=1)
    def forward(self, X: Tensor) -> Tensor:
        """Evaluate on ``X`` of shape ``b x 1 x d``; returns ``Tensor[b]``."""
        value = self.log_ei(X)
        if self.eta > 0.0 and self.log_inverse_cost is not None:
            value = value + self.eta * self.log_inverse_cost(X)
        return value


class LogEIPS(CostAwareLogEI):
    r"""Log expected improvement per second: ``log EI(x) + log E[1 / C(x)]``.

    Args:
        model: The objective model.
        best_f: The incumbent.
        cost_model: One-output model of ``log`` total cost.
        mc_samples: QMC samples of the cost posterior.
        sampler: Overrides the default sampler (tests use mock samplers).
    """

    def __init__(
        self,
        model: Model,
        best_f: float | Tensor,
        cost_model: Model,
        mc_samples: int = 512,
        sampler: MCSampler | None = None,
    ) -> None:
        cost = LogExpectedInverseCost(cost_model, mc_samples=mc_samples, sampler=sampler)
        super().__init__(model, best_f, cost, eta=1.0)


class LogCArBO(CostAwareLogEI):
    r"""CArBO's cost-cooled EI per cost: ``log EI(x) + eta * log E[1 / C(x)]``.

    Args:
        model: The objective model.
        best_f: The incumbent.
        cost_model: One-output model of ``log`` total cost.
        eta: Cost cooling exponent (:func:`cost_cooling`).
        mc_samples: QMC samples of the cost posterior.
        sampler: Overrides the default sampler.
    """

    def __init__(
        self,
        model: Model,
        best_f: float | Tensor,
        cost_model: Model,
        eta: float,
        mc_samples: int = 512,
        sampler: MCSampler | None = None,
    ) -> None:
        cost = LogExpectedInverseCost(cost_model, mc_samples=mc_samples, sampler=sampler)
        super().__init__(model, best_f, cost, eta=eta)


class LogEEIPU(CostAwareLogEI):
    r"""Memoization-aware, cost-cooled EI per cost (EEIPU), in log space.

    .. math::
        \log \mathrm{EI}(x) + \eta \log \mathbb{E}\Big[\frac{1}{\epsilon(\delta)
            + \sum_{k \ge \delta} C_k(x)}\Big],\quad \delta = \delta(x)

    with ``C_k = exp`` of samples of stage ``k``'s log-cost GP and ``delta(x)``
    the number of leading stages of ``x`` that are cached.

    Args:
        model: The objective model.
        best_f: The incumbent.
        cost_model: ``K``-output model of the stages' log compute costs.
        load_costs: ``Tensor[K]``, ``eps(delta)``.
        cached: The available prefixes.
        eta: Cost cooling exponent.
        mc_samples: QMC samples of the cost posterior (reference: 1000).
        sampler: Overrides the default sampler.
        overhead: Fixed cost added to every candidate
            (:class:`LogExpectedInverseCost`).
    """

    def __init__(
        self,
        model: Model,
        best_f: float | Tensor,
        cost_model: Model,
        load_costs: Tensor | None,
        cached: CachedPrefixes | None,
        eta: float,
        mc_samples: int = 512,
        sampler: MCSampler | None = None,
        overhead: float = 0.0,
    ) -> None:
        cost = LogExpectedInverseCost(
            cost_model,
            load_costs=load_costs,
            cached=cached,
            mc_samples=mc_samples,
            sampler=sampler,
            overhead=overhead,
        )
        super().__init__(model, best_f, cost, eta=eta)


class RandomProposer:
    """Random search: independent uniform cube points, reproducible per index.

    Args:
        dim: ``d``.
        seed: Base seed; point ``i`` depends only on ``(seed, i)``, so a restored
            search continues the same sequence.

    Example:
        >>> RandomProposer(3, seed=1).propose(0).shape
        torch.Size([3])
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed

    def propose(self, index: int) -> Tensor:
        """``Tensor[d]``: the ``index``-th random point."""
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(index))
        return torch.rand(self.dim, generator=gen, dtype=torch.double)


# --------------------------------------------------------------------------
# Private numeric helpers
# --------------------------------------------------------------------------


def _marginal_mean_std(model: Model, X: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output posterior mean and standard deviation at ``X`` (``b x 1 x d``).

    A ``ModelListGP`` is queried model by model: cheaper than its joint
    block-diagonal posterior, and all that ``q = 1`` with independent outputs
    needs.

    Returns:
        ``(mean, std)``, each ``b x 1 x K``.
    """
    submodels = getattr(model, "models", None)
    if submodels is not None:
        posteriors = [m.posterior(X) for m in submodels]
        mean = torch.cat([p.mean for p in posteriors], dim=-1)
        var = torch.cat([p.variance for p in posteriors], dim=-1)
    else:
        posterior = model.posterior(X)
        mean, var = posterior.mean, posterior.variance
    return mean, var.clamp_min(1e-12).sqrt()


def _log_expected_inverse_cost(
    log_costs: Tensor, delta: Tensor, load_costs: Tensor, overhead: float = 0.0
) -> Tensor:
    r"""``log mean_s 1 / (o + eps(delta) + sum_{k >= delta} exp(L_sk))``.

    Args:
        log_costs: ``mc x batch_shape x K`` samples ``L`` of the log stage costs.
        delta: ``LongTensor[batch_shape]``, cached stages per point.
        load_costs: ``Tensor[K]``, ``eps``.
        overhead: ``o``, a fixed cost of every candidate.

    Returns:
        ``Tensor[batch_shape]``.
    """
    total = suffix_cost(log_costs, delta, load_costs) + overhead  # mc x batch
    return torch.log(torch.reciprocal(total.clamp_min(1e-300)).mean(0))


def suffix_cost(log_costs: Tensor, delta: Tensor, load_costs: Tensor) -> Tensor:
    r"""``eps(delta) + sum_{k >= delta} exp(L_k)``: what running a point costs when
    its first ``delta`` stages are loaded.

    Args:
        log_costs: ``... x batch_shape x K`` log stage costs ``L``.
        delta: ``LongTensor[batch_shape]``, cached stages per point.
        load_costs: ``Tensor[K]``, ``eps``.

    Returns:
        ``Tensor[... x batch_shape]``.
    """
    n_stages = log_costs.shape[-1]
    stage = torch.arange(n_stages, device=log_costs.device)
    computed = (stage >= delta.unsqueeze(-1)).to(log_costs.dtype)  # batch x K
    # Costs in linear space: a sum of exps is several times cheaper than a
    # masked logsumexp over (mc x batch x K), and safe in double precision for
    # log costs below ~700 (costs below 1e300 units).
    costs = torch.exp(log_costs.clamp(max=700.0)) * computed  # loaded stages: 0
    eps = torch.where(delta > 0, load_costs[delta], torch.zeros_like(load_costs[delta]))
    return costs.sum(-1) + eps
