r"""A memoization-aware Pandora's-box Gittins index (``eeipu_gittins``).

The Gittins index of a candidate ``x`` with objective posterior
``N(mu(x), sigma(x)^2)`` and cost ``c(x)`` is the threshold ``g`` at which
evaluating ``x`` is worth exactly its cost:

.. math::
    \mathbb{E}\big[(f(x) - g)^+\big] = \lambda\, c(x),

and the search evaluates the candidate of largest index (Xie, Astudillo,
Frazier, Scully and Terenin, "Cost-aware Bayesian optimization via the
Pandora's Box Gittins index", NeurIPS 2024). Writing ``g = mu + sigma u``,
``u`` solves ``h(u) = lambda c / sigma`` with ``h(u) = phi(u) - u (1 - Phi(u))``
(the expected improvement of a standard normal over ``u``), which is strictly
decreasing: one bisection per candidate.

Unlike EI per unit cost, where halving a candidate's cost doubles its score
whatever the cost is, the index trades cost against improvement in the
objective's units: it grows only like ``sigma sqrt(2 log(1 / c))`` as a cost
shrinks. A candidate whose expensive prefix is cached, and which only
re-runs cheap downstream stages, is not pulled to the cheapest corner of those
stages (EEIPU's suffix-cost pull), while memoization still makes it cheap
next to a candidate that recomputes everything.

Here:

* ``c(x) = eps(delta(x)) + sum_{k >= delta(x)} E[C_k(x)]`` with the stage
  costs log-normal under the stage log-cost GPs, as EEIPU charges (only the
  uncached stages and the loads);
* the objective is in standard deviations of the observations and ``c`` in
  units of a typical whole run (the sum of the stages' geometric-mean costs),
  so ``lambda`` (:data:`LAMBDA`) does not depend on the pipeline's units;
* cost cooling: the cost used is ``c^eta c_ref^(1 - eta)``, so that as the
  budget runs out (``eta -> 0``) every candidate costs one typical run and the
  index ranks by objective alone.
"""

from __future__ import annotations

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.acquisition.analytic import _log_ei_helper
from botorch.models.model import Model
from botorch.utils.transforms import t_batch_mode_transform
from torch import Tensor

from eeipu_ray.search.acquisition import CachedPrefixes, _marginal_mean_std, suffix_cost
from eeipu_ray.search.strategies.base import (
    AcquisitionInputs,
    CooledStrategy,
    register,
    typical_run_cost,
)

LAMBDA = 0.1
"""Improvement (in standard deviations of the observations) that one typical
whole run must be expected to buy."""

_BISECTIONS = 64


def gittins_u(log_ratio: Tensor) -> Tensor:
    r"""``u`` with ``log h(u) = log_ratio``, ``h(u) = phi(u) - u (1 - Phi(u))``.

    Solved by bisection without gradients, then one Newton step with the
    derivative held fixed, so that gradients with respect to ``log_ratio``
    are the implicit function's, ``du/dlog_ratio = 1 / (d log h / du)``.

    Example:
        >>> u = gittins_u(torch.zeros(1, dtype=torch.double))  # h(u) = 1
        >>> round(float(u), 4)
        -0.8995
    """
    with torch.no_grad():
        ratio = log_ratio.exp()
        lo = -ratio - 2.0  # h(u) > -u for every u, so h(lo) > ratio + 2
        hi = torch.full_like(log_ratio, 40.0)  # log h(40) ~ -807: below any ratio here
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            above = _log_ei_helper(-mid) > log_ratio  # h(mid) > ratio: the root is right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        u0 = 0.5 * (lo + hi)
        log_h = _log_ei_helper(-u0)
        # d log h / du = -(1 - Phi(u)) / h(u)
        slope = -torch.exp(torch.special.log_ndtr(-u0) - log_h)
    return u0 - (log_h - log_ratio) / slope


class MemoGittinsIndex(AcquisitionFunction):
    """The memoization-aware, cost-cooled Gittins index of ``q = 1`` candidates.

    Args:
        model: The objective model (maximized).
        cost_model: ``K``-output model of the stages' log compute costs; each
            output's ``y_shift`` (the mean log cost) sets the reference cost.
        load_costs: ``Tensor[K]``, ``eps(delta)``.
        cached: The available prefixes (``None``: nothing is cached).
        eta: Cost-cooling exponent in ``[0, 1]``.
        lam: ``lambda`` (:data:`LAMBDA`).
        y_scale: Standard deviation of the observations (the model's scale).
    """

    def __init__(
        self,
        model: Model,
        cost_model: Model,
        load_costs: Tensor,
        cached: CachedPrefixes | None,
        eta: float,
        lam: float = LAMBDA,
        y_scale: float = 1.0,
    ) -> None:
        super().__init__(model=model)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam!r}")
        self.cost_model = cost_model
        self.register_buffer("load_costs", load_costs.to(torch.double))
        self.cached = cached
        self.eta = float(eta)
        self.lam = float(lam)
        self.y_scale = float(y_scale) if y_scale > 0 else 1.0
        self.c_ref = typical_run_cost(cost_model) if hasattr(cost_model, "models") else 1.0

    def cost(self, X: Tensor) -> Tensor:
        """``c(x)``: the expected cost of running ``X`` (``b x 1 x d``) now; ``Tensor[b]``."""
        mean, std = _marginal_mean_std(self.cost_model, X)  # b x 1 x K: log costs
        delta = (
            self.cached.depth(X)
            if self.cached
            else torch.zeros(X.shape[:-1], dtype=torch.long, device=X.device)
        )
        log_expected = mean + 0.5 * std**2  # E[C_k] of a log-normal
        return suffix_cost(log_expected, delta, self.load_costs.to(X)).squeeze(-1)

    @t_batch_mode_transform(expected_q=1)
    def forward(self, X: Tensor) -> Tensor:
        """The index, in standard deviations of the observations; ``Tensor[b]``."""
        posterior = self.model.posterior(X)
        mu = posterior.mean.reshape(X.shape[0]) / self.y_scale
        sigma = posterior.variance.clamp_min(1e-18).sqrt().reshape(X.shape[0]) / self.y_scale
        log_cost = self.eta * torch.log(self.cost(X).clamp_min(1e-300) / self.c_ref)
        log_ratio = torch.log(torch.tensor(self.lam, dtype=X.dtype)) + log_cost - sigma.log()
        return mu + sigma * gittins_u(log_ratio)


@register
class EEIPUGittins(CooledStrategy):
    """Memoization-aware Gittins index: EEIPU's costs and prefix pool, the
    Pandora's-box index instead of EI per unit cost."""

    name = "eeipu_gittins"
    needs_stage_costs = True
    memoization_aware = True

    def build(self, inputs: AcquisitionInputs) -> AcquisitionFunction:
        assert inputs.costs.stage_costs is not None
        return MemoGittinsIndex(
            inputs.objective,
            inputs.costs.stage_costs,
            inputs.costs.load_costs,
            inputs.cached,
            eta=inputs.eta,
            lam=LAMBDA,
            y_scale=float(getattr(inputs.objective, "y_scale", 1.0)),
        )
